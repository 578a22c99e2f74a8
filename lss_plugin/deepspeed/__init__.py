"""DeepSpeed adapter: an ``"lss_sequence_parallel"`` config block, an mpu, and double averaging.

    engine, optimizer, _, scheduler = lss_plugin.deepspeed.initialize(model=model, config="ds_config_lss.json")

Stable names (other adapters build on them): ``initialize``, ``LSSConfig`` (``from_ds_config``,
``from_dict``, ``attention``: the block's ``AttentionSettings``), ``LSSConfigError``, ``LSSMpu``, ``BLOCK_KEY``,
``deepspeed_view``, ``load_config``, ``install_lss_gradient_averaging``, ``StepLoss`` (the logged
loss of an optimizer step's global batch).
"""
from lss_plugin.deepspeed.config import BLOCK_KEY, LSSConfig, LSSConfigError, deepspeed_view, load_config
from lss_plugin.deepspeed.engine import initialize
from lss_plugin.deepspeed.metrics import StepLoss
from lss_plugin.deepspeed.mpu import LSSMpu
from lss_plugin.deepspeed.reduction import install_lss_gradient_averaging

__all__ = [
    "BLOCK_KEY", "LSSConfig", "LSSConfigError", "LSSMpu", "StepLoss", "deepspeed_view", "initialize",
    "install_lss_gradient_averaging", "load_config",
]
