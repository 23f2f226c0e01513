"""MQTT topic-filter logic (pure): do two filters match a common topic?"""

from __future__ import annotations


def filters_overlap(a: str, b: str) -> bool:
    """True when some topic matches both filters (Mosquitto would deliver it twice)."""
    pa, pb = a.split("/"), b.split("/")
    for i in range(max(len(pa), len(pb))):
        la = pa[i] if i < len(pa) else None
        lb = pb[i] if i < len(pb) else None
        if la == "#" or lb == "#":
            return True
        if la is None or lb is None:
            return False
        if la != lb and "+" not in (la, lb):
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter` (with + and # wildcards)."""
    fp, tp = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(fp):
        if level == "#":
            return True
        if i >= len(tp) or (level != "+" and level != tp[i]):
            return False
    return len(fp) == len(tp)
