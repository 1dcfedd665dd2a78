"""``rnnlm tokenize``."""

from pathlib import Path

import click

import rnnlm
from rnnlm.store import SHARD_TOKENS
from rnnlm.tokenizer import LEVELS, load_vocab_source

from .common import Command, emit_json, json_option


@click.command(cls=Command)
@click.argument("text", nargs=-1, required=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Directory for the token store: vocab.json, shards tokens*.npy and manifest.json.")
@click.option("--level", type=click.Choice(LEVELS), default="word", help="Tokens: words or characters.")
@click.option("--min-count", type=click.IntRange(min=1), default=1, help="Words seen fewer times become <unk>.")
@click.option("--max-vocab", type=click.IntRange(min=2), default=None,
              help="Keep at most this many tokens (by frequency) [default: all].")
@click.option("--lowercase", is_flag=True, help="Lowercase the text first.")
@click.option("--vocab", "vocab_file", type=click.Path(path_type=Path), default=None,
              help="Encode with this vocabulary (a vocab.json or a model file) [default: build one].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes reading the text [default: the usable cores].")
@click.option("--shard-tokens", type=click.IntRange(min=1, max=1 << 28), default=SHARD_TOKENS, show_default=True,
              help="Token ids per shard.")
@json_option('one {"type": "tokenize", "tokens", "vocab_size", "unk", "unk_share"} record')
def tokenize(text, out_dir, level, min_count, max_vocab, lowercase, vocab_file, workers, shard_tokens, as_json):
    """Turn TEXT... into a token store in DIR: token ids in shards, the vocabulary and a manifest.

    Each TEXT is a file, a glob (quoted, matched in sorted order), - for standard input, or a gzip, bzip2,
    xz or zstd file (decompressed as it is read); they are read as one text, in order.
    """
    vocab = load_vocab_source(vocab_file) if vocab_file else None
    summary = rnnlm.tokenize(list(text), out_dir, level=level, min_count=min_count, max_vocab=max_vocab,
                             lowercase=lowercase, vocab=vocab, workers=workers, shard_tokens=shard_tokens)
    if as_json:
        emit_json("tokenize", **summary)
    else:
        click.echo(f"{summary['tokens']:,} tokens, vocabulary {summary['vocab_size']:,}, "
                   f"{summary['unk_share']:.2%} <unk> -> {out_dir}")
