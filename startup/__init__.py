"""What the pack does once when the host loads it, apart from the nodes: register its model folders and
copy its example photos into the input folder."""
