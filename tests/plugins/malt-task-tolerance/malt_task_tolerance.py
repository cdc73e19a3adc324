"""A complete malt task: a number within 1% of the ground truth counts as right."""

import re

from malt_local.tasks import Task

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class Tolerance(Task):
    name = "tolerance"
    version = "1"
    description = "a number within 1% of the ground truth"

    def extract(self, text, question):
        numbers = NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None

    def key(self, answer, question):
        return None if answer is None else f"{float(answer):.2g}"

    def equal(self, a, b, question):
        if a is None or b is None:
            return False
        x, y = float(a), float(b)
        return abs(x - y) <= 0.01 * max(abs(x), abs(y))
