"""A reward term for loop tests with a tiny random model, which never boxes a right answer: the
share of distinct characters in the response varies between samples, so groups have a spread and
the update has a real gradient (the ±5 math reward alone would give every group equal rewards)."""


def character_variety(response: str, reference: object) -> float:
    return len(set(response)) / max(len(response), 1)
