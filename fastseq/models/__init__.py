from .base import Model
from .peeky import PeekyDecoder, PeekySeq2seq
from .rnnlm import BetterRnnlm, Rnnlm
from .seq2seq import Decoder, Encoder, Seq2seq

__all__ = ["Model", "Encoder", "Decoder", "Seq2seq", "PeekyDecoder", "PeekySeq2seq", "Rnnlm",
           "BetterRnnlm"]
