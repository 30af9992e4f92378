"""InfluxDB line protocol for the core's metrics: one line per metric, tags as tags.

``<measurement>[,<tag>=<value>...] value=<v> <timestamp in ms>``. The measurement is mercure's
dotted name (``mercure.<appliance>.<service>.<name>``, as mercure's own InfluxDB sender wrote
it), so dashboards made for mercure keep working; the metric's tags (``target``, ``action``,
...) become InfluxDB tags. The single field is ``value``:

* a counter's increment as an integer (``value=20i``), the type mercure wrote, so sums stay
  exact (a fractional increment, which the core never sends, is written as a float);
* a gauge's current value and a timing's duration in seconds as floats.

InfluxDB keeps one type per field: gauges are always floats, even when the value is whole.

Commas, spaces and equals signs are escaped with a backslash. A backslash itself cannot be
written so that InfluxDB 1.x and 2.x read it alike (1.x keeps ``\\\\`` as two, 2.x as one, and
neither can end a value with one), so backslashes in names and tag values become ``/``;
line breaks become spaces.
"""

from __future__ import annotations

import math

from mercure.metrics import Metric, metric_path

# Characters with a meaning in line protocol, and what they become.
_MEASUREMENT_ESCAPES = str.maketrans({",": "\\,", " ": "\\ "})
_KEY_ESCAPES = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})
_UNWRITABLE = str.maketrans({"\n": " ", "\r": " ", "\\": "/"})


class UnwritableMetric(ValueError):
    """A metric InfluxDB cannot store (a NaN or infinite value, or an empty name)."""


def escape_measurement(name: str) -> str:
    return name.translate(_UNWRITABLE).translate(_MEASUREMENT_ESCAPES)


def escape_key(key: str) -> str:
    """A tag key, tag value or field key."""
    return key.translate(_UNWRITABLE).translate(_KEY_ESCAPES)


def format_value(metric: Metric) -> str:
    value = float(metric.value)
    if not math.isfinite(value):
        raise UnwritableMetric(f"{metric.name} has the value {value}, which InfluxDB cannot store")
    if metric.kind == "counter" and value.is_integer():
        return f"{int(value)}i"
    return repr(value)


def encode(
    metric: Metric,
    appliance: str,
    prefix: str = "mercure",
    extra_tags: dict[str, str] | None = None,
) -> str:
    """One line (without the newline) for ``metric``; raises :class:`UnwritableMetric`."""
    measurement = metric_path(metric, appliance, prefix)
    if not measurement:
        raise UnwritableMetric("a metric without a name cannot be written")
    tags = {**(extra_tags or {}), **metric.tags}
    # Tag keys sorted, as InfluxDB recommends; empty values cannot be written (and mean "unset").
    tag_part = "".join(
        f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags.items()) if k and v
    )
    timestamp = round(metric.time * 1000)
    return f"{escape_measurement(measurement)}{tag_part} value={format_value(metric)} {timestamp}"


__all__ = ["UnwritableMetric", "encode", "escape_key", "escape_measurement", "format_value"]
