"""task=grpo: group-relative policy optimisation with rewards each site computes itself.

`losses`: the arithmetic (advantages, the clipped loss, its normalisations); `rewards`:
the reward functions (built-in or a site's own) and how answers are scored; `sampling`:
a group of answers per prompt; `task`: `GrpoTask`, what the client loop calls
(imported from there, so the light `rewards` loads without torch).
"""
