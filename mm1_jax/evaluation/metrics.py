"""Captioning and VQA metrics as MM1 reports them: CIDEr, BLEU-4, VQA accuracy.

Pure Python, no Java. Every function takes one prediction per item and the
item's references, in the same order:

    predictions  Sequence[str]                 [N] one decoded answer per item
    references   Sequence[str | Sequence[str]] [N] each item's reference(s);
                                               a bare string is one reference

and returns the corpus score as a fraction (papers print 100x: MM1-3B's
"114.6 CIDEr" is cider() == 1.146, "63.6" VQAv2 is vqa_accuracy() == 0.636).

Captions (`cider`, `bleu4`) are compared as `caption_tokens` gives them:
lower-cased, punctuation turned into spaces, split on whitespace. COCO's
evaluation tokenizes with the Stanford PTB tokenizer (Java) and drops its
punctuation tokens; on plain captions the two give the same words (they
differ on contractions: PTB splits "don't" into "do n't", we into "don t").
Given those tokens, the scores equal pycocoevalcap 1.2's Cider and
Bleu(4) (tests/evaluation/test_metrics.py checks it on hundreds of items).

VQA answers (`vqa_accuracy`, `exact_match`) are normalised as the official
VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py) normalises
predictions: `normalize_vqa_answer`.
"""

from __future__ import annotations

import collections
import math
import re
from typing import Mapping, Sequence

CAPTION, VQA = "caption", "vqa"
KINDS = (CAPTION, VQA)
# Fields of an evaluation report's result that are counts or text, not metrics.
REPORT_COUNT_FIELDS = ("num_queries", "examples", "num_tokens", "num_sequences",
                       "num_truncated", "num_skipped")

MAX_NGRAM = 4
# CIDEr-D's Gaussian length penalty: exp(-delta^2 / (2 sigma^2)).
CIDER_SIGMA = 6.0
# CIDEr's cosine similarities lie in [0, 1]; the authors scale them by 10.
CIDER_SCALE = 10.0
# The guards of the COCO BLEU scorer: an n-gram order with no match gives
# ~1e-15 instead of a division by zero. Kept so our numbers equal COCO's.
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9

Ngram = tuple[str, ...]


# --- inputs -------------------------------------------------------------------

def _reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
  """Each item's references as a list of strings (a bare string is one)."""
  return [[refs] if isinstance(refs, str) else list(refs) for refs in references]


def _checked(predictions: Sequence[str], references: Sequence[str | Sequence[str]]
             ) -> tuple[list[str], list[list[str]]]:
  """(predictions, references as lists); ValueError on empty or mismatched input."""
  predictions = list(predictions)
  references = _reference_lists(references)
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists; "
                     "give one of each per item, in the same order.")
  if not predictions:
    raise ValueError("no items to score.")
  for index, (prediction, refs) in enumerate(zip(predictions, references)):
    if not isinstance(prediction, str):
      raise ValueError(f"item {index}: the prediction must be a string, got {prediction!r}.")
    if not refs or not all(isinstance(r, str) for r in refs):
      raise ValueError(f"item {index}: needs at least one reference string, got {refs!r}.")
  return predictions, references


# --- caption metrics --------------------------------------------------------------

_NOT_WORD = re.compile(r"[^\w\s]|_")


def caption_tokens(text: str) -> list[str]:
  """The words CIDEr and BLEU compare: lower-cased, punctuation-free.

  "A blue Circle." -> ["a", "blue", "circle"]; "black-and-white" ->
  ["black", "and", "white"]. Punctuation becomes a space (not nothing), as
  PTB tokenisation splits it off.
  """
  return _NOT_WORD.sub(" ", text.lower()).split()


def _ngram_counts(words: Sequence[str], max_n: int = MAX_NGRAM) -> collections.Counter:
  """Counts of every 1..max_n-gram of `words` (tuples of words)."""
  counts = collections.Counter()
  for n in range(1, max_n + 1):
    for start in range(len(words) - n + 1):
      counts[tuple(words[start:start + n])] += 1
  return counts


def _tfidf_vector(counts: Mapping[Ngram, int], document_frequency: Mapping[Ngram, int],
                  log_num_items: float) -> tuple[list[dict[Ngram, float]], list[float], int]:
  """CIDEr's view of one sentence.

  Returns (per order n: n-gram -> tf * idf, per order: its L2 norm, length).
  idf = log(#items) - log(max(1, df)): an n-gram no reference uses gets the
  largest weight. `length` counts bigrams (words - 1), as the reference
  implementation does; only differences of lengths are used.
  """
  vectors = [{} for _ in range(MAX_NGRAM)]
  length = 0
  for ngram, term_frequency in counts.items():
    order = len(ngram) - 1
    idf = log_num_items - math.log(max(1.0, document_frequency.get(ngram, 0)))
    vectors[order][ngram] = term_frequency * idf
    if order == 1:
      length += term_frequency
  norms = [math.sqrt(sum(v * v for v in vector.values())) for vector in vectors]
  return vectors, norms, length


def _cider_similarity(hypothesis, reference) -> list[float]:
  """Per n-gram order: clipped tf-idf cosine times the length penalty (CIDEr-D)."""
  hyp_vectors, hyp_norms, hyp_length = hypothesis
  ref_vectors, ref_norms, ref_length = reference
  penalty = math.exp(-float(hyp_length - ref_length) ** 2 / (2 * CIDER_SIGMA ** 2))
  similarities = []
  for order in range(MAX_NGRAM):
    ref_vector = ref_vectors[order]
    # "-D": the hypothesis weight is clipped at the reference's, so repeating
    # a matching n-gram does not raise the score.
    dot = sum(min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
              for ngram, weight in hyp_vectors[order].items())
    if hyp_norms[order] != 0 and ref_norms[order] != 0:
      dot /= hyp_norms[order] * ref_norms[order]
    similarities.append(dot * penalty)
  return similarities


def cider_scores(predictions: Sequence[str],
                 references: Sequence[str | Sequence[str]]) -> list[float]:
  """Per-item CIDEr-D (pycocoevalcap's Cider), on caption_tokens.

  predictions: [N] strings; references: [N] each a string or list of
  strings. The idf weights come from the references of all N items, so an
  item's score depends on the whole set: score the set you report, and use
  hundreds of items (on a handful, most n-grams get idf ~0).
  Returns [N] floats >= 0 (10 = identical to every reference, typically).
  """
  predictions, references = _checked(predictions, references)
  hypothesis_counts = [_ngram_counts(caption_tokens(p)) for p in predictions]
  reference_counts = [[_ngram_counts(caption_tokens(r)) for r in refs] for refs in references]
  # Document frequency: in how many items' references an n-gram occurs.
  document_frequency = collections.Counter()
  for refs in reference_counts:
    document_frequency.update(set().union(*refs))
  log_num_items = math.log(float(len(predictions)))
  scores = []
  for hyp, refs in zip(hypothesis_counts, reference_counts):
    hypothesis = _tfidf_vector(hyp, document_frequency, log_num_items)
    summed = [0.0] * MAX_NGRAM
    for ref in refs:
      similarity = _cider_similarity(hypothesis,
                                     _tfidf_vector(ref, document_frequency, log_num_items))
      summed = [s + x for s, x in zip(summed, similarity)]
    # Mean over n-gram orders, mean over references, times 10.
    scores.append(CIDER_SCALE * (sum(summed) / MAX_NGRAM) / len(refs))
  return scores


def cider(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Corpus CIDEr-D: the mean of cider_scores (COCO's reported "CIDEr" / 100)."""
  scores = cider_scores(predictions, references)
  return sum(scores) / len(scores)


def _closest_length(reference_lengths: Sequence[int], hypothesis_length: int) -> int:
  """The reference length nearest the hypothesis's; ties go to the shorter."""
  return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def bleu4(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Corpus BLEU-4 (pycocoevalcap's Bleu(4)[3]), on caption_tokens.

  predictions: [N] strings; references: [N] each a string or list of
  strings. Clipped n-gram matches (n = 1..4) and lengths are summed over the
  corpus; the brevity penalty uses, per item, the reference length closest
  to the prediction's. Returns a float in [0, 1].

  COCO's scorer guards empty orders with 1e-15 / 1e-9 rather than zero, and
  so do we: predictions without any 4-gram (all of 3 words or fewer, like
  easy-vqa's "a red circle") give p4 = 1e-6 and a score of at most
  1e-6 ** 0.25 ~ 0.03, whatever their quality. Use CIDEr for short captions.
  """
  predictions, references = _checked(predictions, references)
  matches, guesses = [0] * MAX_NGRAM, [0] * MAX_NGRAM
  hypothesis_length = reference_length = 0
  for prediction, refs in zip(predictions, references):
    words = caption_tokens(prediction)
    ref_words = [caption_tokens(r) for r in refs]
    # Each n-gram is credited at most as often as one reference has it.
    max_ref_counts = collections.Counter()
    for ref in ref_words:
      max_ref_counts |= _ngram_counts(ref)
    for ngram, count in _ngram_counts(words).items():
      matches[len(ngram) - 1] += min(count, max_ref_counts[ngram])
    for n in range(1, MAX_NGRAM + 1):
      guesses[n - 1] += max(0, len(words) - n + 1)
    hypothesis_length += len(words)
    reference_length += _closest_length([len(r) for r in ref_words], len(words))
  precision_product = 1.0
  for n in range(MAX_NGRAM):
    precision_product *= (matches[n] + BLEU_TINY) / (guesses[n] + BLEU_SMALL)
  score = precision_product ** (1.0 / MAX_NGRAM)
  ratio = (hypothesis_length + BLEU_TINY) / (reference_length + BLEU_SMALL)
  if ratio < 1:  # Brevity penalty: shorter than the references in total.
    score *= math.exp(1 - 1 / ratio)
  return score


# --- VQA metrics ------------------------------------------------------------------

# Marks the official script deletes or turns into spaces (not the apostrophe:
# "man's" stays, and "dont" is mapped to "don't" below).
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                    ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit ("2.5" keeps its own).
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# The official table of apostrophe-less spellings (entries the script can
# never reach because it lower-cases first, like "Im", are left out).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def strip_vqa_punctuation(text: str) -> str:
  """The official script's punctuation step (it is all it applies to references).

  A mark next to a space ("yes !", "a, b") is deleted, one inside a word
  becomes a space ("t-shirt" -> "t shirt", "red/white" -> "red white");
  in text with a thousands comma ("1,000") every mark is deleted. Periods go
  unless a digit follows ("2.5" stays). Case and spacing are left alone.
  """
  delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
  stripped = text
  for mark in _VQA_PUNCTUATION:
    # The official test looks at the original text, not the partly stripped one.
    touches_space = mark + " " in text or " " + mark in text
    stripped = stripped.replace(mark, "" if touches_space or delete_all else " ")
  return _PERIOD.sub("", stripped)


def normalize_vqa_answer(answer: str) -> str:
  """An answer as the official VQA evaluation compares predictions.

  answer: one string. In order: newlines/tabs -> spaces, outer whitespace
  stripped, strip_vqa_punctuation, lower-cased, number words up to ten ->
  digits ("none" -> "0", "two" -> "2"), articles (a, an, the) dropped,
  apostrophe-less contractions restored ("dont" -> "don't"), words joined by
  single spaces. "The Two dogs." -> "2 dogs".
  """
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  words = []
  for word in strip_vqa_punctuation(text).lower().split():
    word = _NUMBER_WORDS.get(word, word)
    if word not in _ARTICLES:
      words.append(_CONTRACTIONS.get(word, word))
  return " ".join(words)


def vqa_answer_accuracy(prediction: str, references: str | Sequence[str]) -> float:
  """VQA accuracy of one answer against its annotators' answers.

  references: the annotators' answers (VQAv2: 10). With n >= 2 answers,
  as the official script does: the prediction is normalize_vqa_answer'd,
  the references are compared as given (VQA's were normalised when
  collected) except that when they disagree they get strip_vqa_punctuation;
  then for each annotator i, acc_i = min(1, #other annotators matching / 3)
  and the result is the mean over the n leave-one-out subsets, e.g. with 10
  answers: 1, 2, 3 matches -> 0.3, 0.6, 0.9; 4+ -> 1.
  With one reference (easy-vqa, GQA-style sets: there is no one to leave
  out) it counts as unanimous annotators: 1.0 when the prediction and the
  reference normalise alike, else 0.0.
  """
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError("vqa_answer_accuracy needs at least one reference answer.")
  predicted = normalize_vqa_answer(prediction)
  if len(refs) == 1:
    return float(predicted == normalize_vqa_answer(refs[0]))
  if len(set(refs)) > 1:
    refs = [strip_vqa_punctuation(r) for r in refs]
  total_matches = sum(r == predicted for r in refs)
  per_annotator = [min(1.0, (total_matches - (r == predicted)) / 3.0) for r in refs]
  return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(predictions: Sequence[str],
                 references: Sequence[str | Sequence[str]]) -> float:
  """Mean vqa_answer_accuracy over items: the standard VQA accuracy in [0, 1].

  predictions: [N] answers; references: [N] each the annotators' answers
  (a list, or one string).
  """
  predictions, references = _checked(predictions, references)
  return sum(vqa_answer_accuracy(p, r) for p, r in zip(predictions, references)) / len(
      predictions)


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
  """Fraction of items whose normalised prediction equals a normalised reference.

  predictions: [N]; references: [N] each a string or list of strings (any
  one matching counts, as in SQuAD). Both sides go through
  normalize_vqa_answer, so "Two." matches "2".
  """
  predictions, references = _checked(predictions, references)
  hits = sum(normalize_vqa_answer(p) in {normalize_vqa_answer(r) for r in refs}
             for p, refs in zip(predictions, references))
  return hits / len(predictions)


# --- one call per evaluation --------------------------------------------------

def score_predictions(kind: str, predictions: Sequence[str],
                      references: Sequence[str | Sequence[str]]) -> dict[str, float]:
  """The metrics of an evaluation kind, as fractions.

  kind: "caption" -> {"cider", "bleu4"}; "vqa" -> {"vqa_accuracy",
  "exact_match"}. predictions: [N] decoded answers (already cut at the end
  of the answer, see fewshot.truncate_generation); references: [N] each a
  string or list of strings.
  """
  if kind == CAPTION:
    return {"cider": cider(predictions, references), "bleu4": bleu4(predictions, references)}
  if kind == VQA:
    return {"vqa_accuracy": vqa_accuracy(predictions, references),
            "exact_match": exact_match(predictions, references)}
  raise ValueError(f"unknown evaluation kind {kind!r}; choose one of {KINDS}.")
