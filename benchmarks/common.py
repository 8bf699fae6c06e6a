"""What the lever and ceiling benchmarks share: the models they time and the Markdown report they write."""

from __future__ import annotations

import datetime
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import timm
import torch

from backbones.runtime import native_bfloat16, optimize_for_inference
from dwconv import machine_line


def optimized_models(names: List[str], bf16: bool,
                     progress: Callable[[str], None]) -> Iterator[Tuple[str, torch.dtype, torch.nn.Module]]:
    """``(name, dtype, model)`` for each of ``names`` as ``optimize_for_inference`` makes it (random weights, seed
    0): in float32 and, with ``bf16`` on a CPU with native bfloat16, wholly in bfloat16 (elsewhere said and skipped)."""
    for name in names:
        for dtype in [torch.float32] + ([torch.bfloat16] if bf16 else []):
            if dtype == torch.bfloat16 and not native_bfloat16():
                progress(f"{name}: no native bfloat16 on this CPU, skipped")
                continue
            torch.manual_seed(0)
            yield name, dtype, optimize_for_inference(timm.create_model(name, pretrained=False),
                                                      dtype=None if dtype == torch.float32 else dtype)


def write_report(title: str, script: str, argv: Optional[List[str]], details: List[str], body: List[str],
                 begin: float, output: Optional[Path]) -> str:
    """The report's text (``details``: more facts, one bullet each; ``begin``: ``time.perf_counter()`` at the start),
    written to ``output`` if given."""
    command = f"python benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"## {title}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine_line(torch.device('cpu'))}",
        f"- torch {torch.__version__}, timm {timm.__version__}, Python {platform.python_version()}",
        f"- Command: `{command.strip()}`",
        *(f"- {detail}" for detail in details),
        "",
        *body,
        "",
        f"Total benchmark time: {time.perf_counter() - begin:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")
    return text
