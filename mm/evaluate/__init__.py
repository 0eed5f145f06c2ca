"""Evaluation: caption metrics (BLEU, CIDEr-D), VQA accuracy, likelihood multiple choice, the eval runner."""
from mm.evaluate.caption_metrics import bleu, cider_d, ptb_tokenize
from mm.evaluate.choice import option_logprobs
from mm.evaluate.runner import evaluate
from mm.evaluate.samples import EvalSample, read_samples
from mm.evaluate.vqa_metrics import normalize_answer, vqa_accuracy

__all__ = ["bleu", "cider_d", "ptb_tokenize", "option_logprobs", "evaluate", "EvalSample", "read_samples",
           "normalize_answer", "vqa_accuracy"]
