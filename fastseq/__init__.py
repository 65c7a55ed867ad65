"""fastseq: fast from-scratch recurrent sequence models (textbook names, three engines)."""
from . import backend
from .functions import clip_grads, softmax
from .layers import (TimeAffine, TimeAttention, TimeDropout, TimeEmbedding, TimeLSTM,
                     TimeSoftmaxWithLoss)
from .models import (AttentionDecoder, AttentionEncoder, AttentionSeq2seq, BetterRnnlm, Decoder,
                     Encoder, PeekyDecoder, PeekySeq2seq, Rnnlm, Seq2seq)
from .optim import SGD, Adam
from .files import load
from .trainer import RnnlmTrainer, Trainer, eval_perplexity, eval_seq2seq

__version__ = "0.1.0"

__all__ = ["backend", "clip_grads", "softmax", "TimeAffine", "TimeDropout", "TimeEmbedding",
           "TimeLSTM", "TimeSoftmaxWithLoss", "Encoder", "Decoder", "PeekyDecoder", "Seq2seq",
           "PeekySeq2seq", "Rnnlm", "BetterRnnlm", "SGD", "Adam", "Trainer", "eval_seq2seq",
           "RnnlmTrainer", "eval_perplexity", "load", "TimeAttention", "AttentionEncoder",
           "AttentionDecoder", "AttentionSeq2seq", "__version__"]
