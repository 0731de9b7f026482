"""Every family member of ``families_matrix.CASES``: converted exactly (G = H), equal to the
mean-pooled MHA model (G < H), saved and reloaded, exported to MHA, converted by the CLI from
its own format, run with every scheme; or refused in one line before anything changes.
``scripts/families_table.py`` runs the same checks to write ``docs/families.md``."""

from __future__ import annotations

from pathlib import Path

import families_matrix as fm
import pytest

CONVERTED = [c for c in fm.CASES if c.refuses is None]
REFUSED = [c for c in fm.CASES if c.refuses is not None]


def _ids(cases: list[fm.Case]) -> list[str]:
    return [f"{c.library}:{c.name.split(' (')[0]}" for c in cases]


@pytest.mark.parametrize("case", REFUSED, ids=_ids(REFUSED))
def test_refused_in_one_line_before_anything_changes(case: fm.Case) -> None:
    fm.check_refusal(case)


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_same_heads_is_exact(case: fm.Case) -> None:
    assert fm.check_same_heads(case) <= fm.RTOL


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_fewer_heads_equal_mean_pooled_mha(case: fm.Case) -> None:
    error, change = fm.check_fewer_heads(case)
    assert error <= fm.RTOL
    assert change > 100 * fm.RTOL  # pooling really changed the function


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_calibrated_groups_equal_mha_pooled_by_them(case: fm.Case) -> None:
    if "calibrated" in case.known_gaps:
        from kdgqa.errors import ConversionError

        with pytest.raises(ConversionError, match="calibration objective inexact"):
            fm.check_calibrated(case)
        return
    assert fm.check_calibrated(case) <= fm.RTOL


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_save_load_round_trip(case: fm.Case, tmp_path: Path) -> None:
    assert fm.check_round_trip(case, tmp_path) == 0.0


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_export_mha(case: fm.Case, tmp_path: Path) -> None:
    if "export" in case.known_gaps:
        from kdgqa.errors import ExportError

        with pytest.raises(ExportError):
            fm.check_export(case, tmp_path)
        return
    assert fm.check_export(case, tmp_path) <= fm.RTOL


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_export_native_gqa_or_one_line_refusal(case: fm.Case, tmp_path: Path) -> None:
    from kdgqa.errors import ExportError
    from kdgqa.io.export_native import native_gqa_available

    if not native_gqa_available():
        pytest.skip("the installed timm's Eva takes no num_kv_heads")
    if case.native:
        assert fm.check_native(case, tmp_path / "native") <= fm.RTOL
        return
    with pytest.raises(ExportError) as refused:
        fm.check_native(case, tmp_path / "native")
    assert "\n" not in str(refused.value) and "use export_mha" in str(refused.value)
    assert not (tmp_path / "native").exists()  # nothing half-written


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_cli_converts_the_library_format(case: fm.Case, tmp_path: Path) -> None:
    assert fm.check_cli(case, tmp_path) >= 2  # every attention layer (counted inside)


@pytest.mark.parametrize("case", CONVERTED, ids=_ids(CONVERTED))
def test_every_scheme_converts_and_runs(case: fm.Case) -> None:
    from kdgqa.schemes.registry import SCHEMES

    refused = fm.CALIBRATED_SCHEMES if "calibrated" in case.known_gaps else ()
    assert fm.check_schemes(case) == [s for s in SCHEMES if s not in refused]
