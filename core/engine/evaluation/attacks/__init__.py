"""The robustness audits, in the order they run and report: each an `Audit` (its
settings in, its figures and the settings it used out), so a new attack is one function
and one entry in AUDITS. core.engine.evaluation.evidence runs them on the unlearned model."""

from core.engine.evaluation.attacks.context import (
    Audit,
    AuditContext,
    audit_context,
    forget_questions,
)
from core.engine.evaluation.attacks.in_context import in_context_audit
from core.engine.evaluation.attacks.quantization import quantization_audit
from core.engine.evaluation.attacks.relearn import relearn_audit

AUDITS = (
    Audit("relearn", lambda robustness: robustness.relearn, relearn_audit),
    Audit("quantization", lambda robustness: robustness.quantization, quantization_audit),
    Audit("in_context", lambda robustness: robustness.in_context, in_context_audit),
)

__all__ = ["AUDITS", "Audit", "AuditContext", "audit_context", "forget_questions"]
