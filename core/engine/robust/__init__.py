"""Robust and selective forgetting (docs/methods.md, "Robust and selective forgetting"):
selective updates (selective), the attack in the loop (attack_loop) and distillation
after unlearning (distill). The options are typed in core.engine.spec.robust."""
