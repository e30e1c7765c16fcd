// Opens a FaceStudio workflow at the view saved in it (its extra.ds), also from the templates browser.
// Frontend 1.48 fits every template it opens to the window, whatever the file says; for a workflow of
// 20-30 nodes that is below the scale at which it draws text. It restores extra.ds for a file it opens,
// and 1.27 does for templates too: this does the same for FaceStudio's own workflows only (marked in
// extra.facestudio_workflow by scripts/make_workflows.py), after the frontend has configured the graph,
// and only with the user's "restore the view" setting on.
import { app } from "../../scripts/app.js";

function viewRestoreOn() {
  const setting = app.extensionManager?.setting;
  return setting?.get ? setting.get("Comfy.EnableWorkflowViewRestore") !== false : true;
}

app.registerExtension({
  name: "FaceStudio.SavedView",
  async afterConfigureGraph() {
    const extra = app.graph?.extra;
    const ds = extra?.ds;
    if (!extra?.facestudio_workflow || !ds || !Array.isArray(ds.offset) || !(ds.scale > 0) || !viewRestoreOn()) {
      return;
    }
    const canvas = app.canvas;
    canvas.ds.offset = [Number(ds.offset[0]), Number(ds.offset[1])];
    canvas.ds.scale = Number(ds.scale);
    canvas.setDirty(true, true);
  },
});
