import importlib
import pkgutil

from .attention import AttentionDecoder, AttentionEncoder, AttentionSeq2seq
from .base import REGISTRY, Model, register
from .peeky import PeekyDecoder, PeekySeq2seq
from .rnnlm import BetterRnnlm, Rnnlm
from .seq2seq import Decoder, Encoder, Seq2seq

# every module in this package registers its models on import: a new model is one file
for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Model", "REGISTRY", "register", "Encoder", "Decoder", "Seq2seq", "PeekyDecoder",
           "PeekySeq2seq", "Rnnlm", "BetterRnnlm", "AttentionEncoder", "AttentionDecoder",
           "AttentionSeq2seq"]
