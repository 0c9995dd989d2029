"""qvlm: build your own small vision-language model the BLIP-2 way.

`import qvlm` registers the model with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageTextToText, AutoProcessor), so saved qvlm folders load as any transformers model.
"""

__version__ = "0.1.0"

from qvlm.models.configuration import QVLMPretrainedConfig  # noqa: E402
from qvlm.models.modeling import (  # noqa: E402
    QVLMForConditionalGeneration,
    QVLMForImageTextRetrieval,
    register_auto_classes,
)
from qvlm.models.processing import QVLMProcessor  # noqa: E402
from qvlm.models.vlm import QVLM  # noqa: E402

register_auto_classes()

__all__ = ["QVLM", "QVLMForConditionalGeneration", "QVLMForImageTextRetrieval", "QVLMPretrainedConfig",
           "QVLMProcessor", "__version__"]
