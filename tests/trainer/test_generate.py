"""Generation: cached decoding equals plain decoding, sampling filters and seeds behave, EOS stops
it, prompts match the training template, and streamed text is exact."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.trainer.conftest import tiny_config as shared_tiny_config
from trainer.checkpoint import TOKENIZER, save_model
from trainer.data import Record, format_prompt, tokenize
from trainer.generate import StreamDecoder, generate, main, next_token, prompt_text
from trainer.model import Config, LLaMA

pytestmark = pytest.mark.unit

PROMPT = "浙江省的省会是哪里？"


def tiny_config(vocab_size: int) -> Config:
    return shared_tiny_config(vocab_size, max_seq_len=96)


@pytest.fixture(scope="module")
def model(tokenizer) -> LLaMA:
    torch.manual_seed(0)
    return LLaMA(tiny_config(tokenizer.vocab_size)).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkpoint")
    save_model(model, out)
    shutil.copyfile(tokenizer.path, out / TOKENIZER)
    return out


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(model: LLaMA, ids: list[int], **options) -> list[int]:
    settings = dict(max_new_tokens=12, temperature=0.0, top_k=None, top_p=1.0, eos_id=None, generator=None)
    return generate(model, ids, **{**settings, **options})


def test_cached_greedy_decoding_equals_argmax_without_cache(model):
    prompt = [1, 17, 230, 5, 99]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert sample(model, prompt, max_new_tokens=20) == ids[len(prompt) :]
    assert sample(model, prompt, max_new_tokens=20) == ids[len(prompt) :]  # the cache was cleared


class Scripted(nn.Module):
    """A stand-in whose greedy continuation of any 3-token prompt is `script`."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.config = Config(vocab_size=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=2, max_seq_len=32)
        self.tok_embeddings = nn.Embedding(16, 2)
        self.script = script
        self.cache_len: int | None = None

    def setup_kv_cache(self, batch_size: int, max_seq_len: int) -> None:
        self.cache_len = max_seq_len

    def clear_kv_cache(self) -> None:
        self.cache_len = None

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(1, idx.size(1), 16)
        logits[0, -1, self.script[int(input_pos[-1]) - 2]] = 1.0
        return logits


def test_decoding_stops_at_the_first_eos():
    seen = []
    scripted = Scripted([5, 7, 2, 9, 2])
    new = sample(scripted, [1, 4, 4], eos_id=2, on_token=seen.append)
    assert new == seen == [5, 7, 2]
    assert scripted.cache_len is None
    assert sample(scripted, [1, 4, 4], eos_id=3, max_new_tokens=4) == [5, 7, 2, 9]


def test_context_bounds_the_answer(model):
    assert len(sample(model, [1] * 90, max_new_tokens=50)) == 6  # max_seq_len 96
    with pytest.raises(ValueError, match="room for an answer"):
        sample(model, [1] * 96)


def test_top_k_one_is_greedy(model):
    greedy = sample(model, [1, 40, 41])
    generator = torch.Generator().manual_seed(0)
    assert sample(model, [1, 40, 41], temperature=1.5, top_k=1, generator=generator) == greedy


def test_seeded_sampling_repeats(model):
    def draw(seed: int) -> list[int]:
        return sample(
            model, [1, 40, 41], temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(seed)
        )

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert draw(3) != sample(model, [1, 40, 41])


@pytest.mark.parametrize(
    ("top_k", "top_p", "kept"), [(None, 0.7, {0, 1}), (None, 0.9, {0, 1, 2}), (2, 1.0, {0, 1})]
)
def test_filters_keep_the_likeliest_tokens(top_k, top_p, kept):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    generator = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, top_k, top_p, generator) for _ in range(300)}
    assert drawn == kept


def test_prompts_are_the_training_prompts_or_raw(tokenizer):
    text = prompt_text(PROMPT, "alpaca_zh")
    assert text == format_prompt(Record(PROMPT, "", ""), "alpaca_zh") and text.endswith("### 回答:")
    templated = tokenizer.encode(text, bos=True)
    assert templated == tokenize(tokenizer, Record(PROMPT, "", "杭州。"), "alpaca_zh").prompt
    raw = tokenizer.encode(prompt_text(PROMPT, None), bos=True)
    assert raw == [tokenizer.bos_id, *tokenizer.encode(PROMPT, bos=False)]
    assert len(templated) > len(raw) + 10
    with_input = prompt_text("把下面的词翻译成英文。", "alpaca", input_text="猫")
    assert "### Input:\n猫\n\n### Response:" in with_input


def test_json_output(checkpoint, model, tokenizer, capsys):
    argv = ["--checkpoint", str(checkpoint), "--prompt", PROMPT, "--temperature", "0"]
    code, out, _ = run([*argv, "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    keys = {"prompt", "template", "text", "token_ids", "new_tokens", "stop_reason", "seconds", "tokens_per_s"}
    assert set(result) == keys
    assert result["prompt"] == prompt_text(PROMPT, "alpaca")
    expected = sample(model, tokenizer.encode(result["prompt"]), max_new_tokens=6, eos_id=tokenizer.eos_id)
    assert result["token_ids"] == expected and result["new_tokens"] == 6
    assert result["stop_reason"] == ("eos" if expected[-1] == tokenizer.eos_id else "length")
    assert result["text"] == tokenizer.decode([t for t in expected if t != tokenizer.eos_id])

    code, out, err = run([*argv, "--max-new-tokens", "6"], capsys)
    assert code == 0 and out == result["text"] + "\n" and "tokens/s" in err

    code, out, _ = run([*argv, "--raw", "--max-new-tokens", "2", "--json"], capsys)
    assert json.loads(out)["prompt"] == PROMPT


def test_eos_stops_the_command(tokenizer, tmp_path, capsys):
    """Blocks that add nothing, one embedding for every token, and a head that scores only EOS."""
    model = LLaMA(tiny_config(tokenizer.vocab_size))
    with torch.no_grad():
        model.tok_embeddings.weight.fill_(1.0)
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.output.weight.zero_()
        model.output.weight[tokenizer.eos_id] = 1.0
    save_model(model, tmp_path)
    shutil.copyfile(tokenizer.path, tmp_path / TOKENIZER)
    code, out, _ = run(["--checkpoint", str(tmp_path), "--prompt", PROMPT, "--json"], capsys)
    result = json.loads(out)
    assert code == 0
    assert (result["token_ids"], result["stop_reason"], result["text"]) == ([tokenizer.eos_id], "eos", "")


def test_chinese_streams_whole_characters(tokenizer):
    text = "你好，龘世界！杭州的省会是杭州。"
    ids = tokenizer.encode(text, bos=False)
    assert any(tokenizer.processor.is_byte(i) for i in ids)  # characters spelled in UTF-8 bytes
    decoder = StreamDecoder(tokenizer)
    chunks = [decoder.push(i) for i in ids]
    assert "".join(chunks) + decoder.flush() == text
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "龘" in chunks


def test_bad_input_exits_2(checkpoint, tmp_path, capsys):
    code, _, err = run(["--checkpoint", str(tmp_path / "none"), "--prompt", "x"], capsys)
    assert code == 2 and err.startswith("error: ") and "tokenizer.model not found" in err
    code, _, err = run(["--checkpoint", str(checkpoint), "--prompt", "长" * 200, "--raw"], capsys)
    assert code == 2 and "context" in err
    code, _, err = run(["--checkpoint", str(checkpoint), "--prompt", "x", "--lora", str(tmp_path)], capsys)
    assert code == 2 and "cannot read adapters" in err
