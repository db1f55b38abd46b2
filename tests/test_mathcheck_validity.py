"""Validity filters (verification/mathcheck/validity.py)."""

from __future__ import annotations

import pytest

from verification.mathcheck import validity_issue


@pytest.mark.parametrize(
    ("problem", "reference", "issue"),
    [
        ("Prove that there are infinitely many primes.", None, "proof_problem"),
        ("Show that $n^2+n$ is even for every integer $n$.", "0", "proof_problem"),
        ("Let $x$ be real. Find $x$ and justify that it is unique.", "2", "proof_problem"),
        ("Simplify $\\frac{6}{8}$.", "\\frac{6}{8}", "trivial_answer"),
        ("Expand $(x+1)^2$.", "$(x+1)^2$", "trivial_answer"),
        ("Find the sum of the roots of $x^2-5x+6=0$.", "", "trivial_answer"),
        ("Find the sum of the roots of $x^2-5x+6=0$.", "\\boxed{}", "trivial_answer"),
        ("Solve $x^2+1=0$ over the reals.", "\\text{no solution}", "degenerate_answer"),
        ("Evaluate $\\lim_{x\\to0} 1/x^2$.", "\\infty", "degenerate_answer"),
        ("Find x.", "does not exist", "degenerate_answer"),
        ("Which is prime? (A) 4 (B) 6 (C) 7 (D) 8 (E) 9", "(C)", "multiple_choice_letter"),
        (
            "Which is prime? $\\textbf{(A)}\\ 4 \\qquad \\textbf{(B)}\\ 7$",
            "\\textbf{(B)}",
            "multiple_choice_letter",
        ),
        # legitimate answers that must pass
        ("A bag has $5$ red and $3$ blue balls; two more red are added. How many red?", "7", None),
        ("There are 2 cats and 1 dog. How many dogs are there?", "1", None),
        ("What is $1+1$ minus one?", "1", None),
        ("Let $a=\\sqrt{2}$. Find $a^3/a^2$.", "\\sqrt{2}", None),
        # choosing one of the problem's own formulas (here a label) is a guess among givens
        ("Which vertex, $A$ or $B$, is farther from the origin?", "A", "trivial_answer"),
        ("The waterproof box holds 3 liters. How many for 4 boxes?", "12", None),
        ("Find the number of solutions of $x^2=4$.", "2", None),
        ("Find all $x$ with $x^2<0$; if there are none, answer 0.", "0", None),
        ("Any problem.", None, None),
    ],
)
def test_validity_issue(problem, reference, issue):
    assert validity_issue(problem, reference) == issue
