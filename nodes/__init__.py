"""ComfyUI node classes: thin V3 schemas that call encoders/ and attention/."""
from .adapter_loader import FaceStudioAdapterLoader
from .apply import FaceStudioApply, FaceStudioPerson
from .face_analyzer import FaceStudioFaceAnalyzerLoader
from .identity import FaceStudioIdentityEncode, FaceStudioIdentityLoad, FaceStudioIdentityMix, FaceStudioIdentitySave
from .preview import FaceStudioFacePreview
from .pulid_flux import (FaceStudioPuLIDFluxApply, FaceStudioPuLIDFluxIdentityEncode, FaceStudioPuLIDFluxLoader,
                         FaceStudioPuLIDFluxPerson)
from .regions import FaceStudioRegionMask, FaceStudioRegionPrompt, FaceStudioRegions
from .scoring import FaceStudioIdentityScore
from .style import FaceStudioStyleEncode
from .training import FaceStudioSaveAdapter, FaceStudioTrainAdapter
from .training_data import FaceStudioPrepareDataset

NODE_LIST = [
    FaceStudioAdapterLoader,
    FaceStudioFaceAnalyzerLoader,
    FaceStudioIdentityEncode,
    FaceStudioIdentityMix,
    FaceStudioIdentitySave,
    FaceStudioIdentityLoad,
    FaceStudioStyleEncode,
    FaceStudioPerson,
    FaceStudioApply,
    FaceStudioFacePreview,
    FaceStudioRegions,
    FaceStudioRegionMask,
    FaceStudioRegionPrompt,
    FaceStudioIdentityScore,
    FaceStudioPuLIDFluxLoader,
    FaceStudioPuLIDFluxIdentityEncode,
    FaceStudioPuLIDFluxPerson,
    FaceStudioPuLIDFluxApply,
    FaceStudioPrepareDataset,
    FaceStudioTrainAdapter,
    FaceStudioSaveAdapter,
]
