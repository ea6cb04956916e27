"""Every ``zptr.*`` GGUF metadata key, in one place (as gguf-py's ``Keys`` holds llama.cpp's).

Model files carry :class:`Keys.General`, :class:`Keys.Soul`, :class:`Keys.Source` and
``Keys.Omega.SIDECAR``; the Omega sidecar file carries the rest of :class:`Keys.Omega`. The
tensor names are :class:`zptr.tensor_names.Tensors` (core: checkpoints use them too).
"""

from __future__ import annotations

PREFIX = "zptr."


class Keys:
    class General:
        FORMAT_VERSION = "zptr.format_version"

    class Soul:
        FOLDED = "zptr.soul.folded"  # output.weight holds W' = W (I + sigmoid(alpha) R)
        ALPHA = "zptr.soul.alpha"
        GATE = "zptr.soul.gate"  # sigmoid(alpha)
        ROTATION = "zptr.soul.rotation"  # so8 | dense
        ORTHOGONALITY_ERROR = "zptr.soul.orthogonality_error"  # max |R^T R - I|
        PHASE = "zptr.soul.phase"  # stable | transitioning | golden
        # the fold untied a tied embedding: quantizers keep the embedding's tied precision
        UNTIED_EMBEDDING = "zptr.soul.untied_embedding"

    class Source:
        BASE_MODEL = "zptr.source.base_model"
        STEP = "zptr.source.step"
        CHECKPOINT_SHA256 = "zptr.source.checkpoint_sha256"

    class Omega:
        SIDECAR = "zptr.omega.sidecar"  # in the model file: the sidecar's file name
        # in the sidecar file:
        FORMAT_VERSION = "zptr.omega.format_version"
        HIDDEN_SIZE = "zptr.omega.hidden_size"
        ROUTING = "zptr.omega.routing"
        BOUNDARY_THRESHOLD = "zptr.omega.boundary_threshold"
        DEPTH_THRESHOLD = "zptr.omega.depth_threshold"
        PHASE_THRESHOLD = "zptr.omega.phase_threshold"
        ORIGIN_SCALE = "zptr.omega.origin_scale"
        PHASE_DECAY = "zptr.omega.phase_decay"
        GATE = "zptr.omega.gate"  # omega, the residual gate's logit
        MODEL_FILE = "zptr.omega.model_file"
        MODEL_SHA256 = "zptr.omega.model_sha256"
        SCALAR_TENSORS = "zptr.omega.scalar_tensors"  # 0-d tensors, stored with shape (1,)
