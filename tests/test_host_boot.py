def test_pack_imports_under_the_hosts_module_name(pack, booted):
    import folder_paths

    assert pack.__name__ == booted.pack_module_name
    assert folder_paths.base_path == str(booted.base)
