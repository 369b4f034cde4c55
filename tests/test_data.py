"""Corpus, token files, splits and deterministic batches."""
import numpy as np
import pytest

from streaming_muloco.data import ByteTokenizer, DataError, TokenSplits, bundled_corpus_bytes, get_batch, load_tokens


def test_bundled_corpus_is_real_text_over_a_megabyte():
    text = bundled_corpus_bytes().decode("utf-8")
    assert len(text) > 1_000_000
    assert "HAMLET" in text and "Romeo" in text


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    s = "To be, or not to be — ça va"
    assert tok.decode(tok.encode(s)) == s


def test_held_out_split_is_the_disjoint_tail():
    tokens = np.arange(10_000) % 256
    splits = TokenSplits.from_tokens(tokens.astype(np.uint8), 0.1, block_size=32)
    assert len(splits.train) == 9000 and len(splits.val) == 1000
    assert np.array_equal(splits.val, tokens[9000:].astype(np.uint8))


def test_batches_are_deterministic_per_seed_stream_step():
    tokens = load_tokens(None)
    a = get_batch(tokens, 4, 32, seed=1, stream=0, step=5)
    b = get_batch(tokens, 4, 32, seed=1, stream=0, step=5)
    c = get_batch(tokens, 4, 32, seed=1, stream=1, step=5)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[0] == c[0]).all()
    assert (a[0][:, 1:] == a[1][:, :-1]).all()  # targets are inputs shifted by one


def test_memmapped_token_file_loads(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)
    tokens = load_tokens(str(path), "uint16", vocab_size=50304)
    assert isinstance(tokens, np.memmap) and tokens[4999] == 4999


def test_text_file_is_byte_tokenized(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world")
    assert bytes(load_tokens(str(path))) == b"hello world"


def test_missing_path_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match="does-not-exist.*--data"):
        load_tokens(str(tmp_path / "does-not-exist.bin"))


def test_token_ids_beyond_vocab_are_rejected(tmp_path):
    path = tmp_path / "t.bin"
    np.array([1, 2, 300], dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match="300 >= model.vocab_size 256"):
        load_tokens(str(path), "uint16", vocab_size=256)


def test_dtype_too_small_for_vocab_is_rejected(tmp_path):
    path = tmp_path / "t.bin"
    np.array([1, 2], dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match="use uint32"):
        load_tokens(str(path), "uint16", vocab_size=100_000)


def test_file_size_not_multiple_of_dtype_is_rejected(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="not a multiple of 2"):
        load_tokens(str(path), "uint16")


def test_split_too_small_for_block_size_is_rejected():
    with pytest.raises(DataError, match="too few"):
        TokenSplits.from_tokens(np.zeros(100, dtype=np.uint8), 0.1, block_size=32)
