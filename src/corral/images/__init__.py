"""Templates' root filesystems: a content-addressed store of read-only layers, the
overlay mount that gives a sandbox one as `/` with its own writable layer on top, and
build plans compiled from Dockerfiles, YAML recipes and E2B's Template builder.

`flatten` merges a stack of layers into one.
"""

from corral.images._context import BuildContext
from corral.images._dockerfile import parse_dockerfile
from corral.images._flatten import flatten
from corral.images._overlay import mount_merged, mount_overlay, overlay_options, unmount_overlay
from corral.images._recipe import parse_e2b_template, parse_recipe
from corral.images._steps import (
    Base,
    BuildPlan,
    BuildState,
    BuildStep,
    ContextFile,
    TemplateMetadata,
    cache_key,
    cache_keys,
)
from corral.images._store import Layer, LayerStore, tree_digest

__all__ = [
    "Base",
    "BuildContext",
    "BuildPlan",
    "BuildState",
    "BuildStep",
    "ContextFile",
    "Layer",
    "LayerStore",
    "TemplateMetadata",
    "cache_key",
    "cache_keys",
    "flatten",
    "mount_merged",
    "mount_overlay",
    "overlay_options",
    "parse_dockerfile",
    "parse_e2b_template",
    "parse_recipe",
    "tree_digest",
    "unmount_overlay",
]
