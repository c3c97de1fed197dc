"""The `protoreg` command group. Subcommands live beside the code they drive and load lazily,
so `protoreg train --help` never imports bpy and `protoreg gen-shards` never imports the trainer."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute" of a click command
COMMANDS: dict[str, str] = {
    "gen-shards": "generator.cli:gen_shards",
    "inspect": "generator.cli:inspect_cmd",
    "verify": "generator.cli:verify_cmd",
    "finalize": "generator.cli:finalize_cmd",
    "show-identities": "protoreg.identities_cli:show_identities",
    "train": "trainer.cli:train_from_shards",
    "train-from-shards": "trainer.cli:train_from_shards",
    "enroll": "trainer.recognition_cli:enroll",
    "recognize": "trainer.recognition_cli:recognize",
    "evaluate": "trainer.recognition_cli:evaluate",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                return None  # that half of the project is not installed
            raise
        return getattr(module, attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="protoreg")
def main() -> None:
    """protoreg: zero-shot, interpretable human recognition by 2D-3D registration."""
