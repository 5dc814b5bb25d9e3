"""A user replacement registered from outside surgeon (`--plugin tests.plugin_example`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from surgeon.rewrites import Edit, ModelEditor, SkipSite, register_rewrite
from surgeon.schema import ActionSchema, ParamSpec
from surgeon.sites import Site


class MaxToAvg:
    """Turn a max pool into an average pool with the same arithmetic."""

    schema = ActionSchema(
        "max-to-avg",
        {"count_include_pad": ParamSpec("count_include_pad", bool, True)},
        "max pool -> average pool",
    )

    def apply(self, editor: ModelEditor, site: Site, params: Mapping[str, Any]) -> Edit:
        if site.op != "max_pool" or site.dims != 2 or isinstance(site.padding, str):
            raise SkipSite("only 2-d max pools")
        pool = nn.AvgPool2d(
            site.kernel,
            site.stride,
            site.padding,
            ceil_mode=site.ceil_mode,
            count_include_pad=bool(params["count_include_pad"]),
        )
        path = editor.replace_site(site, pool, "avg")
        return Edit(site.name, "max-to-avg", "AvgPool2d", "approximate", (path,), path)


register_rewrite(MaxToAvg(), replace=True)
