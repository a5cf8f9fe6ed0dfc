"""ModelOpt's ``nn.modules`` path: every quantized module class, and the extra ones to register.

Linear, ConvNd, ConvTransposeNd and (as in ModelOpt) RNN, LSTM and GRU are registered by default. :data:`EXTRA_MODULES` maps the
classes ModelOpt also registers (Embedding, BatchNorm, InstanceNorm, LayerNorm, pooling,
LeakyReLU) to their quantized classes; they are not registered by default because configs'
``"*input_quantizer"`` pattern would then quantize every norm and pooling input. Opt in with
``for original, quantized in EXTRA_MODULES.items(): mtq.register(original, quantized)``.
"""

from torch import nn

from quant_core.nn.modules import (
    quant_activations,
    quant_conv,
    quant_embedding,
    quant_linear,
    quant_module,
    quant_norms,
    quant_pooling,
    quant_rnn,
    tensor_quantizer,
)
from quant_core.nn.modules.quant_activations import *  # noqa: F403
from quant_core.nn.modules.quant_activations import QuantLeakyReLU
from quant_core.nn.modules.quant_conv import *  # noqa: F403
from quant_core.nn.modules.quant_embedding import QuantEmbedding
from quant_core.nn.modules.quant_linear import *  # noqa: F403
from quant_core.nn.modules.quant_module import *  # noqa: F403
from quant_core.nn.modules.quant_norms import *  # noqa: F403
from quant_core.nn.modules.quant_norms import (
    QuantBatchNorm1d,
    QuantBatchNorm2d,
    QuantBatchNorm3d,
    QuantInstanceNorm1d,
    QuantInstanceNorm2d,
    QuantInstanceNorm3d,
    QuantLayerNorm,
)
from quant_core.nn.modules.quant_pooling import *  # noqa: F403
from quant_core.nn.modules.quant_pooling import (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMaxPool3d,
)
from quant_core.nn.modules.quant_rnn import *  # noqa: F403
from quant_core.nn.modules.tensor_quantizer import *  # noqa: F403

EXTRA_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Embedding: QuantEmbedding,
    nn.BatchNorm1d: QuantBatchNorm1d,
    nn.BatchNorm2d: QuantBatchNorm2d,
    nn.BatchNorm3d: QuantBatchNorm3d,
    nn.InstanceNorm1d: QuantInstanceNorm1d,
    nn.InstanceNorm2d: QuantInstanceNorm2d,
    nn.InstanceNorm3d: QuantInstanceNorm3d,
    nn.LayerNorm: QuantLayerNorm,
    nn.MaxPool1d: QuantMaxPool1d,
    nn.MaxPool2d: QuantMaxPool2d,
    nn.MaxPool3d: QuantMaxPool3d,
    nn.AvgPool1d: QuantAvgPool1d,
    nn.AvgPool2d: QuantAvgPool2d,
    nn.AvgPool3d: QuantAvgPool3d,
    nn.AdaptiveAvgPool1d: QuantAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: QuantAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: QuantAdaptiveAvgPool3d,
    nn.LeakyReLU: QuantLeakyReLU,
}

__all__ = sorted(
    {
        "EXTRA_MODULES",
        *quant_activations.__all__,
        *quant_conv.__all__,
        *quant_embedding.__all__,
        *quant_linear.__all__,
        *quant_module.__all__,
        *quant_norms.__all__,
        *quant_pooling.__all__,
        *quant_rnn.__all__,
        *tensor_quantizer.__all__,
    }
)
