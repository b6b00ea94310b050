"""GenEval's correctness rule for one image (Ghosh et al. 2023, evaluation/evaluate_images.py), on detected objects.

An image is correct when every include holds and no exclude does:
- include {class, count}: at least `count` objects of the class; only the first `count` (most confident: here the
  largest) are looked at further;
- with "color": at least `count` of those have that colour;
- with "position": [relation, i]: each of those stands in that relation (GenEval's margin rule,
  data.scenes.relative_position) to each object matched by include i; an include that failed leaves no target;
- exclude {class, count}: fails when `count` or more objects of the class are found (a counting prompt for N objects
  excludes N+1).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from micro_diffusion.data.scenes import POSITION_THRESHOLD, relative_position


class Found(Protocol):
    """What the rule needs of a detected object."""

    colour: str
    box: tuple[float, float, float, float]


def evaluate(objects: Mapping[str, Sequence[Found]], metadata: Mapping[str, Any],
             threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """(correct, reasons it is not) of one image's objects (class -> objects, most confident first)."""
    correct, reasons, matched = True, [], []
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = list(objects.get(name, []))[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            hits = sum(o.colour == req["color"] for o in found)
            if hits < count:
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found {hits} {req['color']}")
        if ok and "position" in req:
            relation, target = req["position"]
            targets = matched[target] if target < len(matched) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relative_position(o.box, t.box, threshold) for o in found for t in targets):
                ok = False
                reasons.append(f"expected {name} {relation} target")
        correct &= ok
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(objects.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, reasons
