"""easy_vqa_vqa_documents: few-shot-style VQA documents for instruction tuning."""

import itertools
import re

import seqio

from mm1_jax.data import tasks

PAIR = re.compile(r"<image> Question: ([^<]*?) Answer: ([^<]*)")


def first(task, count):
  dataset = seqio.get_mixture_or_task(task).get_dataset(None, split="train", shuffle=False)
  return list(itertools.islice(dataset.as_numpy_iterator(), count))


def test_documents_are_real_question_answer_image_triples_in_the_fewshot_format():
  vocabulary = tasks.VOCABULARY
  singles = {(bytes(ex["images"][0]), vocabulary.decode(ex["inputs"].tolist()),
              vocabulary.decode(ex["targets"].tolist()))
             for ex in first("easy_vqa_vqa", None)}
  documents = first("easy_vqa_vqa_documents", 20)
  assert len(documents) == 20
  for document in documents:
    assert len(document["inputs"]) == 0
    text = vocabulary.decode(document["targets"].tolist())
    pairs = PAIR.findall(text)
    # The evaluator's k-shot layout: demonstrations joined with no separator.
    assert text == "".join(f"<image> Question: {q} Answer: {a}" for q, a in pairs)
    assert len(pairs) == len(document["images"]) == tasks.VQA_DOCUMENT_QUESTIONS
    for image, (question, answer) in zip(document["images"], pairs):
      assert (bytes(image), f"<image> Question: {question} Answer:", f" {answer}") in singles
    # Questions about several different images, not one image's questions in a row.
    assert len(set(map(bytes, document["images"]))) > 1
  assert [d["targets"].tolist() for d in first("easy_vqa_vqa_documents", 3)] == \
      [d["targets"].tolist() for d in documents[:3]]


def test_sft_mixture_mixes_single_questions_and_documents():
  mixture = seqio.get_mixture_or_task("easy_vqa_sft")
  assert sorted(task.name for task in mixture.tasks) == ["easy_vqa_vqa", "easy_vqa_vqa_documents"]
