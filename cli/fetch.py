"""``rnnlm fetch``."""

from pathlib import Path

import click

from rnnlm.fetch import CORPORA, DOWNLOADS, URL_BASE_ENV
from rnnlm.fetch import fetch as fetch_corpus

from .common import Command, Progress, emit_json, json_option

CORPUS_LIST = "\b\nCorpora (download size):\n" + "\n".join(
    f"  {corpus.name:<13}{corpus.size / 1e6:>9,.1f} MB  {corpus.description}" for corpus in CORPORA.values())


class Reporter:
    """The library's ``progress(label, done, total)`` on stderr: a Progress bar for each download, one line for
    each stage of unknown length."""

    def __init__(self):
        self.bar, self.label = None, None

    def __call__(self, label, done, total):
        if label != self.label:
            self.close()
            self.label = label
            if total is None:
                click.echo(f"{label} ...", err=True)
            else:
                self.bar = Progress(label)
        if self.bar is not None:
            self.bar.update(done, total)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command(cls=Command, epilog=CORPUS_LIST)
@click.argument("name", metavar="NAME", type=click.Choice(list(CORPORA)))
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
              help="Where the corpus goes: DATA_DIR/NAME/.")
@click.option("--url-base", envvar=URL_BASE_ENV, show_envvar=True, default=None, metavar="URL",
              help="A mirror holding the registry's file names (http(s):// or file://) [default: the sources].")
@click.option("--force", is_flag=True, help="Fetch again, replacing what is in DATA_DIR/NAME.")
@click.option("--tokenize/--no-tokenize", default=True, help="Tokenize the splits into DATA_DIR/NAME/tokens/.")
@click.option("--keep-download", is_flag=True, help=f"Keep the verified downloads in DATA_DIR/NAME/{DOWNLOADS}/.")
@json_option('one {"type": "fetch", "name", "dir", "skipped", "level", "min_count", "sources", "splits"} record')
def fetch(name, data_dir, url_base, force, tokenize, keep_download, as_json):
    """Download a standard corpus into DATA_DIR/NAME/, checked and tokenized.

    Writes train.txt, valid.txt, test.txt (where NAME has one), their token directories (tokens/SPLIT/, the
    vocabulary from train) and, last, fetch.json.

    Downloads are checked against the registry's size and SHA-256; a cut connection leaves a .part file in
    DATA_DIR/NAME/downloaded/ that the same command resumes. Once fetch.json is written the corpus is complete,
    and fetching it again does nothing unless --force.
    """
    reporter = Reporter()
    try:
        result = fetch_corpus(name, data_dir, url_base=url_base, force=force, tokenize=tokenize,
                              keep_download=keep_download, progress=reporter)
    finally:
        reporter.close()
    target = data_dir / name
    if as_json:
        emit_json("fetch", dir=str(target), **result)
    elif result["skipped"]:
        click.echo(f"{target} is complete already (fetch.json); --force fetches it again")
    else:
        for split in result["splits"].values():
            tokens = f", {split['tokens']:,} tokens ({split['unk']:,} <unk>)" if "tokens" in split else ""
            click.echo(f"{target / split['file']}: {split['bytes']:,} bytes{tokens}")
        if tokenize:
            click.echo(f"vocabulary {result['splits']['train']['vocab_size']:,} -> {target / 'tokens'}")
