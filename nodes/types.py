"""The pack's own socket types, shared by every node so the editor only connects matching wires."""
from comfy_api.latest import io

# An IPAdapterWeights (attention/adapters.py): a recognised IP-Adapter FaceID / image-prompt file.
FaceStudioAdapter = io.Custom("FACESTUDIO_ADAPTER")
# A FaceAnalyzer (encoders/faces.py): an insightface detector + recognizer pair, loaded.
FaceStudioFaceAnalyzer = io.Custom("FACESTUDIO_FACE_ANALYZER")
# A FaceIdentity (encoders/identity.py): one person from one or more photos.
FaceStudioIdentity = io.Custom("FACESTUDIO_IDENTITY")
# A StyleEncoding (encoders/style.py): CLIP vision features of a style image.
FaceStudioStyle = io.Custom("FACESTUDIO_STYLE")
# A tuple of attention.persons.Person: the persons for FaceStudio Apply, in order (never changed in place).
FaceStudioPersons = io.Custom("FACESTUDIO_PERSONS")
# An EncodedDataset (training/dataset.py): a folder of photos encoded for training, with its report.
FaceStudioDataset = io.Custom("FACESTUDIO_DATASET")
