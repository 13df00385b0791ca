"""MixDQ's two layer groups.

Content layers are those whose quantization changes what the image shows (MixDQ Sec. 3.2, App. D): the
cross-attention layers (diffusers' `attn2`: to_q, to_k, to_v, to_out) and the feed-forward networks (`ff`) of
every transformer block. Quality layers are the rest: convolutions, self-attention (`attn1`), proj_in/out,
time embedding. The rule is a regex over the layer name (`CONTENT_PATTERN`), overridable."""
from __future__ import annotations

import re
from typing import Sequence

CONTENT_PATTERN = r"(^|\.)(attn2|ff)\."
GROUPS = ("content", "quality")


class GroupError(ValueError):
    """A grouping rule that leaves a group empty (or is not a valid regex)."""


def layer_groups(layers: Sequence[str], content_regex: str | None = None,
                 require_both: bool = True) -> dict[str, str]:
    """{layer: "content" | "quality"}: content when `content_regex` (default `CONTENT_PATTERN`) matches the name
    (re.search). Both groups must be non-empty (unless not `require_both`): MixDQ allocates each its own budget."""
    pattern = content_regex or CONTENT_PATTERN
    try:
        rule = re.compile(pattern)
    except re.error as e:
        raise GroupError(f"--content-regex {pattern!r} is not a valid regular expression ({e})") from None
    groups = {n: "content" if rule.search(n) else "quality" for n in layers}
    for g in GROUPS:
        if require_both and layers and g not in groups.values():
            raise GroupError(f"--content-regex {pattern!r} leaves the {g} group empty ({len(layers)} layers, all "
                             f"{'quality' if g == 'content' else 'content'}); use a pattern that matches some but "
                             f"not all layers, such as the default {CONTENT_PATTERN!r}")
    return groups
