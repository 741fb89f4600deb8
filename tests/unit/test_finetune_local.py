"""The local backend's plain parts (no torch needed): the plan, text and labels, claiming a job."""

from __future__ import annotations

from datetime import timedelta

import pytest

from models import JobStatus, store
from models.schema import utcnow
from tests.unit.test_finetune_helpers import make_context, make_sweep, sweep_config
from worker.finetune.local_backend import (
    IGNORE_INDEX,
    Plan,
    encode_example,
    encode_prompt,
    prompt_and_reply,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "18, man, flight"},
    {"role": "assistant", "content": "He flies."},
]


class CharTokenizer:
    """One id per character; EOS is 0; no chat template unless given one."""

    eos_token_id = 0

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</>" for m in messages)
        return text + "<assistant>" if add_generation_prompt else text


def text(ids):
    return "".join(chr(i) for i in ids)


@pytest.mark.parametrize(("finetune", "examples", "plan"), [
    ({}, 20, Plan(epochs=3, batch_size=8, total_steps=9)),  # "auto": 3 epochs, batch 8
    ({"n_epochs": 2, "batch_size": 4}, 10, Plan(2, 4, 6)),
    ({"n_epochs": 5, "batch_size": 4, "max_steps": 7}, 10, Plan(3, 4, 7)),  # capped mid-epoch
    ({"n_epochs": 1, "batch_size": 4, "max_steps": 100}, 10, Plan(1, 4, 3)),  # a cap above the run changes nothing
])
def test_plan(finetune, examples, plan):
    assert Plan.of(sweep_config(finetune=finetune).finetune, examples) == plan


def test_simple_format_learns_only_the_reply_and_where_it_ends():
    tokenizer = CharTokenizer()
    prompt, reply = prompt_and_reply(tokenizer, MESSAGES)
    assert prompt == "system: Be brief.\nuser: 18, man, flight\nassistant:" and reply == " He flies."
    ids, labels = encode_example(tokenizer, MESSAGES, max_length=1000)
    assert text(ids) == prompt + reply + "\x00"
    assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert text(labels[len(prompt):]) == reply + "\x00"
    assert text(encode_prompt(tokenizer, MESSAGES[:2])) == prompt


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tokenizer = CharTokenizer(chat_template="{{ messages }}")
    ids, labels = encode_example(tokenizer, MESSAGES, max_length=1000)
    prompt = "<system>Be brief.</><user>18, man, flight</><assistant>"
    assert text(ids) == prompt + "He flies.</>"  # the template closes the turn: no extra EOS
    assert text(label for label in labels if label != IGNORE_INDEX) == "He flies.</>"


def test_truncation_keeps_ids_and_labels_aligned():
    ids, labels = encode_example(CharTokenizer(), MESSAGES, max_length=20)
    assert len(ids) == len(labels) == 20
    assert set(labels) == {IGNORE_INDEX}  # the prompt alone fills it: nothing left to learn


def test_a_local_job_is_claimed_once_unless_its_trainer_went_silent(tmp_path):
    ctx = make_context(tmp_path)
    sweep, dataset_id = make_sweep(ctx, config=sweep_config(finetune={"backend": "local"}))
    job = store.create_job(ctx.engine, sweep.id, dataset_id, "local", "/models/tiny")
    store.set_status(ctx.engine, job.id, JobStatus.QUEUED)
    assert store.claim_local(ctx.engine, job.id, stale_after=600)
    assert not store.claim_local(ctx.engine, job.id, stale_after=600)  # a live trainer has it
    store.update_job(ctx.engine, job.id, updated_at=utcnow() - timedelta(seconds=700))
    assert store.claim_local(ctx.engine, job.id, stale_after=600)  # its worker died
    store.set_status(ctx.engine, job.id, JobStatus.SUCCEEDED)
    store.update_job(ctx.engine, job.id, updated_at=utcnow() - timedelta(days=1))
    assert not store.claim_local(ctx.engine, job.id, stale_after=600)  # finished jobs stay finished
