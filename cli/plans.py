"""`echo-mlx plans`: the sharing-plan presets, resolved for a model."""

from typing import List, Optional

import typer


def plans(
    model: Optional[str] = typer.Option(None, help="Resolve presets for this model (default: the embedded SmolLM2)."),
    layers: Optional[int] = typer.Option(None, help="Resolve presets for this many layers instead of loading a model."),
    plan: List[str] = typer.Option([], help="Resolve only these plans (repeatable)."),
):
    """List the sharing-plan presets, resolved for a model."""
    from echo_mlx.models.plans import PRESETS, SharingPlan

    num_layers = layers or _num_layers(model or "default")
    half = max(2, num_layers // 2)
    concrete = {":K": ":2", ":N": f":{half}", ":B": f":{half}", "yoco:W": "yoco:4096", "lckv:W": "lckv:2"}
    examples = list(plan)
    for preset in [] if plan else PRESETS:
        for generic, value in concrete.items():
            preset = preset.replace(generic, value)
        examples.append(preset)
    typer.echo(f"{num_layers} layers; N = number of layers computing K/V; reduction = KV cache saving")
    for text in examples:
        resolved = SharingPlan.parse(text, num_layers)
        iterated = " (iterative: targets above consumers)" if resolved.cyclic_blocks else ""
        if resolved.attention_consumers:
            iterated += f" (EchoAtt: {len(resolved.attention_consumers)} layers cache V only)"
        typer.echo(f"{text:<20} {len(resolved.producers):>3} K/V layers  {resolved.kv_reduction:5.2f}x  {resolved}{iterated}")


def _num_layers(model: str) -> int:
    from echo_mlx.io import checkpoint
    from echo_mlx.io.sources import load_source

    if checkpoint.is_echo_checkpoint(model):
        return checkpoint.load_config(model)["num_hidden_layers"]
    return load_source(model).config["num_hidden_layers"]
