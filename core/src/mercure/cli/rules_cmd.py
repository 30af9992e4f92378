"""``mercure rules test``: evaluate rules against a DICOM file or a tags JSON and explain."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mercure.cli.context import ConfigOption, die, load
from mercure.rules import RuleError, compile_rule
from mercure.tags import read_tags

app = typer.Typer(help="Test routing rules before they go live.", no_args_is_help=True)


def _tags(source: Path, extra: list[str]) -> dict[str, str]:
    if source.suffix.lower() == ".json":
        try:
            data = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            raise die(f"cannot read tags JSON {source}: {exc}") from None
        if not isinstance(data, dict):
            raise die(f"{source} must hold a JSON object of tag name to value")
        return {str(k): str(v) for k, v in data.items()}
    try:
        return read_tags(str(source), extra)
    except Exception as exc:
        raise die(f"cannot read DICOM file {source}: {exc}") from None


@app.command("test")
def test(
    source: Path = typer.Argument(..., help="A DICOM file, or a .json file of tag values."),
    rule: str | None = typer.Option(None, "--rule", "-r", help="A rule text to test."),
    name: str | None = typer.Option(None, "--name", "-n", help="Test only this configured rule."),
    config: Path | None = ConfigOption,
) -> None:
    """Evaluate one rule text, one configured rule, or every configured rule; explain each."""
    if rule is not None:
        tags = _tags(source, [])
        try:
            result = compile_rule(rule).evaluate(tags)
        except RuleError as exc:
            raise die(f"{exc}\n{exc.caret()}") from None
        typer.echo(result.explain())
        raise typer.Exit(0 if result.matched else 3)
    loaded = load(config)
    cfg = loaded.config
    tags = _tags(source, list(cfg.dicom_receiver.additional_tags))
    names = [name] if name else list(cfg.rules)
    if name and name not in cfg.rules:
        raise die(f"no rule named '{name}' (rules: {', '.join(cfg.rules) or 'none'})")
    from mercure.services.router import evaluate_rules

    decision = evaluate_rules(cfg, tags)
    for rule_name in names:
        r = cfg.rules[rule_name]
        state = "disabled" if r.disabled else "fallback" if r.fallback else r.action
        typer.echo(f"rule '{rule_name}' ({state}): {r.rule}")
        result = decision.results.get(rule_name) or compile_rule(r.rule).evaluate(tags)
        for line in result.explain().splitlines():
            typer.echo(f"  {line}")
    if not name:
        if decision.discard_rule:
            typer.echo(f"=> discarded by rule '{decision.discard_rule}'")
        elif decision.triggered:
            how = " (fallback)" if decision.fallback_used else ""
            typer.echo(f"=> triggered{how}: {', '.join(decision.triggered)}")
        else:
            typer.echo("=> no rule matches: the series goes to discard/")
