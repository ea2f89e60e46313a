"""Where jobs run: cloud providers and the local machine, behind one contract (infra.base)."""
