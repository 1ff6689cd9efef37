"""Every pretraining ablation in one go: Tables 4, 5, 6, 8 and Fig. 6 over one set of runs. A variant x seed that
several tables share (EPIC at mask ratio 0.35 is a row of Tables 4, 5, 6 and 8; vanilla of Tables 4 and 8) runs
once; units go seed by seed, so a stopped run leaves whole seeds behind. Each study's report goes to OUT/<study>/
(the same files as running that study alone on the same --runs)."""
from __future__ import annotations

from dataclasses import replace

from . import fig6, table4, table5, table6, table8

STUDIES = {"table4": table4, "table5": table5, "table6": table6, "table8": table8, "fig6": fig6}
TABLES = (table4, table5, table6, table8)  # Fig. 6 reads Table 6's runs (fig6.VARIANTS is table6.VARIANTS)


def units(study):
    """The tables' units, each run folder once, seed-major (phase 0, the teachers, still comes first)."""
    seen, out = set(), []
    for module in TABLES:
        for unit in module.units(study):
            if unit.key not in seen:
                seen.add(unit.key)
                out.append(unit)
    return sorted(out, key=lambda u: u.seed)  # stable: within a seed, the tables' order


def report(study):
    tables = []
    for name, module in STUDIES.items():
        sub = replace(study, name=name, out=study.out / name)
        sub.out.mkdir(parents=True, exist_ok=True)
        tables.append(module.report(sub))
    return "\n\n".join(tables)
