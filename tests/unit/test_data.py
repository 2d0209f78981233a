"""Prompt datasets: jsonl and parquet, keys, templates and chat template, the length filter,
malformed rows reported with file and line, and the exactly resumable shuffled cursor."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megarl.config import DataConfig
from megarl.rollout.data import DatasetError, PromptDataset, PromptSampler
from tests.fixtures.tiny_model import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode())
    return path


def test_jsonl_and_parquet_with_custom_keys_and_templates(tmp_path, tokenizer):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"question": "1+1?", "solution": 2},
                                               {"question": "2+2?", "solution": "4"}])
    table = pa.table({"question": ["3+3?"], "solution": ["6"], "extra": [1]})
    parquet = tmp_path / "b.parquet"
    pq.write_table(table, parquet)
    cfg = DataConfig(train_files=[str(jsonl), str(parquet)], prompt_key="question",
                     answer_key="solution", prompt_template="Q: {prompt} Put it in \\boxed{{}}.",
                     system_prompt="Be brief.")
    data = PromptDataset.from_config(cfg, tokenizer)
    assert len(data) == 3
    assert [p.answer for p in data.prompts] == ["2", "4", "6"]
    first = data[0]
    assert first.text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                          "Q: 1+1? Put it in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    assert list(first.token_ids) == tokenizer(first.text, add_special_tokens=False)["input_ids"]
    assert first.source == f"{jsonl}:1" and data[2].source == f"{parquet}:1"


def test_json_arrays(tmp_path, tokenizer):
    path = tmp_path / "arr.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]))
    data = PromptDataset([path], tokenizer)
    assert len(data) == 1 and data.stats.reported == [f"{path}:2: missing key 'answer' (keys: prompt)"]
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "a"')
    with pytest.raises(DatasetError, match="broken.json: not a valid JSON array"):
        PromptDataset([broken], tokenizer)


def test_chat_message_prompts_and_plain_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
         "answer": "x"}])
    chat = PromptDataset([path], tokenizer, system_prompt="ignored: a system message exists")
    assert chat[0].text.startswith("<|im_start|>system\nS<|im_end|>")
    plain = PromptDataset([path], tokenizer, apply_chat_template=False)
    assert plain[0].text == "S\n\nhi"


def test_malformed_rows_are_skipped_counted_and_reported_with_file_and_line(tmp_path, tokenizer,
                                                                            caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "good", "answer": "1"},
        b"{not json\n",
        {"prompt": "no answer"},
        b"\xff\xfe\n",
        {"prompt": 5, "answer": "1"},
        {"prompt": [{"role": "user"}], "answer": "1"},
        {"prompt": "ok", "answer": ["list"]},
        b"[1, 2]\n",
        {"prompt": "good again", "answer": 3.5},
    ])
    with caplog.at_level(logging.WARNING, logger="megarl.rollout.data"):
        data = PromptDataset([path], tokenizer, max_reported_bad_rows=3)
    assert len(data) == 2 and data.stats.num_rows == 9 and data.stats.num_malformed == 7
    assert data.stats.reported == [
        f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"{path}:3: missing key 'answer' (keys: prompt)",
        f"{path}:4: not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: "
        "invalid start byte)",
    ]
    assert sum("skipping malformed row" in r.message for r in caplog.records) == 3


def test_length_filter_counts_skipped_prompts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "len.jsonl", [{"prompt": "x" * n, "answer": "a"} for n in (1, 50, 5)])
    data = PromptDataset([path], tokenizer, max_prompt_tokens=30)
    assert len(data) == 2 and data.stats.num_too_long == 1
    assert all(len(p.token_ids) <= 30 for p in data.prompts)


def test_unusable_datasets_fail_clearly(tmp_path, tokenizer):
    with pytest.raises(DatasetError, match="does not exist"):
        PromptDataset([tmp_path / "missing.jsonl"], tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": 1}])
    with pytest.raises(DatasetError, match=r"no usable prompt.*bad.jsonl:1: missing key 'prompt'"):
        PromptDataset([bad], tokenizer)


def test_shuffled_cursor_resumes_exactly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": f"p{i}", "answer": str(i)} for i in range(7)])
    data = PromptDataset([path], tokenizer)
    sampler = PromptSampler(data, seed=5)
    first_epoch = [p.answer for p in sampler.next(7)]
    assert sorted(first_epoch, key=int) == [str(i) for i in range(7)]
    assert first_epoch != [str(i) for i in range(7)]  # shuffled
    head = [p.answer for p in sampler.next(3)]  # into epoch 1, a different order
    state = sampler.state_dict()
    assert state["epoch"] == 1 and state["position"] == 3
    rest = [p.answer for p in sampler.next(9)]

    resumed = PromptSampler(data, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints hold plain JSON
    assert [p.answer for p in resumed.next(9)] == rest
    again = PromptSampler(data, seed=5)
    assert [p.answer for p in again.next(10)] == first_epoch + head
    assert [p.answer for p in PromptSampler(data, seed=5, shuffle=False).next(3)] == ["0", "1", "2"]
    with pytest.raises(DatasetError, match="seed"):
        PromptSampler(data, seed=6).load_state_dict(state)
    smaller = PromptDataset([write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "answer": "1"}])],
                            tokenizer)
    with pytest.raises(DatasetError, match="data changed"):
        PromptSampler(smaller, seed=5).load_state_dict(state)
