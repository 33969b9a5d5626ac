"""The method registry: options derived from the samplers, one-line errors for unknown or ill-typed options in
the API, the command line and batch, and the registry read by the CLI (no hard-coded method lists)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from pydicom.data import get_testdata_file

import recon
from recon.cli import build_parser, main
from recon.operators import CartesianMRI, Inpainting, ParallelBeamCT
from recon.samplers import METHODS, OptionError, get_method, recommended_method
from recon.samplers.registry import COMMON_ARGUMENTS, _docstring_args, _fits

CT_SMALL = get_testdata_file("CT_small.dcm")


def test_options_are_the_sampler_keyword_arguments():
    for name, spec in METHODS.items():
        params = inspect.signature(spec.sampler).parameters
        expected = [p for p in params if p not in COMMON_ARGUMENTS and params[p].kind is not params[p].VAR_KEYWORD]
        assert list(spec.options) == expected, name
        for opt in spec.options.values():
            default = params[opt.name].default
            assert opt.default == spec.implies.get(opt.name, default), (name, opt.name)


def test_every_long_running_method_takes_the_checkpoint_options():
    for name, spec in METHODS.items():
        has = {"checkpoint", "checkpoint_every", "resume"} <= set(spec.options)
        assert has == spec.long_running, name


def test_docstring_args_parse_single_grouped_and_continued_entries():
    doc = """Summary.

    Args:
        a: first line
            continued.
        b, c (int): shared text.
        d_e: last.

    Returns:
        nothing.
    """
    assert _docstring_args(doc) == {"a": "first line continued.", "b": "shared text.", "c": "shared text.",
                                    "d_e": "last."}


@pytest.mark.parametrize(("value", "hint", "ok"), [
    (0.3, float, True), (3, float, True), (True, float, False), ("x", float, False), (None, float | None, True),
    ("rho", float | str | None, True), (2, int, True), (2.5, int, False), ("a", str, True), ((1, 2), tuple, True),
    (object(), torch.Tensor, True),
])
def test_type_check(value, hint, ok):
    assert _fits(value, hint) is ok


def test_unknown_and_ill_typed_options_raise_one_line_value_errors():
    op = Inpainting((8, 8), torch.ones(8, 8))
    y = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"method 'tv' has no option 'bogus' \(its options: .*lam"):
        recon.reconstruct(op, y, method="tv", bogus=1)
    with pytest.raises(OptionError, match="method 'analytic' has no option 'zeta' \\(its options: none\\)"):
        recon.reconstruct(op, y, method="analytic", zeta=0.3)
    with pytest.raises(OptionError, match=r"option 'zeta' expects float \| None, got 'big'"):
        recon.reconstruct(op, y, torch.nn.Identity(), method="dps", zeta="big")
    with pytest.raises(OptionError, match="unknown method 'nope'; choose one of dps"):
        recon.reconstruct(op, y, method="nope")
    with pytest.raises(OptionError, match="needs a prior"):
        recon.reconstruct(op, y, method="dps")


def test_implied_options_are_given_options_overridable():
    spec = get_method("dds3d")
    assert spec.check_options({})["gamma"] == "rho"
    assert spec.check_options({"gamma": 0.5})["gamma"] == 0.5
    assert get_method("dds").check_options({}) == {}


def test_the_recommended_method_follows_the_operator_modality():
    assert ParallelBeamCT((8, 8), angles=4).modality == "ct"
    assert CartesianMRI((8, 8), acceleration=2).modality == "mri"
    for modality in ("ct", "mri", "image", None):
        assert recommended_method(modality) in METHODS


@pytest.mark.parametrize(("method", "option"), [("tv", "options.bogus=1"), ("analytic", "options.zeta=0.3"),
                                                ("dps", "options.zeta=abc")])
def test_cli_bad_option_is_one_line_exit_2(tmp_path, capsys, method, option):
    code = main(["reconstruct", "-i", CT_SMALL, "-o", str(tmp_path / "r.npy"), "--task", "inpainting", "--method",
                 method, "--set", option, "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("recon: error: method"), err
    assert not list(tmp_path.iterdir())  # nothing written


def test_batch_bad_option_is_one_error_not_a_retried_study(tmp_path):
    from recon.batch import BatchError, run_batch

    studies = tmp_path / "in"
    studies.mkdir()
    (studies / "a.nii.gz").write_bytes(b"")
    with pytest.raises(BatchError, match="method 'tv' has no option 'bogus'"):
        run_batch(studies, tmp_path / "out", method="tv", task="inpainting", options={"bogus": 1})
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,output,method,options.zeta\nin/a.nii.gz,a,analytic,0.3\n")
    with pytest.raises(BatchError, match="row 2: method 'analytic' has no option 'zeta'"):
        run_batch(manifest, tmp_path / "out2", task="inpainting")


def test_cli_reads_the_registry():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("reconstruct", "batch"):
        method = next(a for a in sub[command]._actions if a.dest == "method")
        assert list(method.choices) == list(METHODS)
    demo = next(a for a in sub["demo"]._actions if a.dest == "method")
    assert set(demo.choices) == {m for m, s in METHODS.items() if s.needs_prior and s.conditional}


def test_recon_methods_lists_the_registry_and_one_methods_options(capsys):
    assert main(["methods", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["methods"]
    assert [r["method"] for r in table] == list(METHODS)
    assert main(["methods", "dds3d", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["long_running"] and {r["option"]: r["default"] for r in info["options"]}["gamma"] == "rho"
    assert main(["methods", "hybrid", "--json"]) == 0  # a modality's tuned values are shown next to the default
    from recon.samplers.registry import TUNED_OPTIONS

    rows = {r["option"]: r for r in json.loads(capsys.readouterr().out)["options"]}
    assert {k: rows[k]["by_modality"]["mri"] for k in TUNED_OPTIONS["mri"]["hybrid"]} == TUNED_OPTIONS["mri"]["hybrid"]
    assert "by_modality" not in rows["eta"]
    assert main(["methods", "nope"]) == 2



# ----------------------------------------------------------------------------------------------- task table
def test_task_parameters_are_declared_once_and_checked_the_same_everywhere():
    from recon.operators.parameters import PARAMETERS
    from recon.restoration.degradations import Degradation
    from recon.tasks import DEFAULTS, TASK_TABLE, TaskError, make_task

    for task in TASK_TABLE.values():
        assert set(task.defaults) - {"complex"} <= set(PARAMETERS), task.name
    with pytest.raises(TaskError, match=r"^views must be an integer >= 1, got 0$"):
        make_task("sparse-view-ct", (1, 8, 8), (1, 1, 1), views=0)
    with pytest.raises(ValueError, match=r"^views must be an integer >= 1, got 0$"):
        Degradation("sparse-view-ct", views=0)
    with pytest.raises(TaskError, match="arc must be a number in \\(0, 180\\] degrees"):
        make_task("limited-angle-ct", (1, 8, 8), (1, 1, 1), arc=200)
    with pytest.raises(TaskError, match="mask_type must be one of random"):
        make_task("mri", (1, 8, 8), (1, 1, 1), mask_type="spiral")
    assert make_task("sparse-view-ct", (1, 8, 8), (1, 1, 1), views=30.0).params["views"] == 30
    assert DEFAULTS["sparse-view-ct"] == TASK_TABLE["sparse-view-ct"].defaults
    from recon.samplers.hybrid import voxel_spacing
    from recon.tasks import build_physics

    for task in ("sparse-view-ct", "mri"):  # the operators carry the voxel size the volume samplers read
        assert voxel_spacing(build_physics(make_task(task, (4, 8, 8), (3.0, 0.5, 0.5)))) == (3.0, 0.5, 0.5), task


def test_cli_task_flags_come_from_the_parameter_table(capsys):
    from recon.operators.parameters import PARAMETERS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    flags = {a.dest for a in sub["simulate"]._actions}
    assert set(PARAMETERS) <= flags
    assert main(["simulate", "-i", CT_SMALL, "-o", "/nonexistent/m.npz", "--task", "sparse-view-ct", "--views",
                 "0"]) == 2
    assert capsys.readouterr().err.strip() == "recon: error: --views must be an integer >= 1, got 0"


def test_a_noise_level_inconsistent_with_the_data_is_a_one_line_error():
    op = Inpainting((8, 8), torch.ones(8, 8))
    y = 0.1 * torch.ones(1, 1, 8, 8)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_y must be a finite number >= 0"):
            recon.reconstruct(op, y, method="tv", sigma_y=bad)
    with pytest.raises(ValueError, match=r"sigma_y = 5 is inconsistent with the data: the measurements' RMS is only"):
        recon.reconstruct(op, y, method="tv", sigma_y=5.0)
    assert recon.reconstruct(op, y, method="tv", sigma_y=0.05, steps=5).x.shape == (1, 1, 8, 8)


def test_the_recommended_method_can_depend_on_the_task():
    from recon.samplers.registry import RECOMMENDED, RECOMMENDED_BY_TASK
    from recon.tasks import TASK_TABLE

    assert set(RECOMMENDED_BY_TASK) <= set(TASK_TABLE)
    for task, method in RECOMMENDED_BY_TASK.items():
        assert recommended_method("ct", task) == method in METHODS
    assert recommended_method("ct", "sparse-view-ct") == RECOMMENDED["ct"]


def test_mri_volumes_have_their_own_default_and_every_caller_tells_them_apart():
    """The registry's default for MRI images is not the one for MRI volumes (``RECOMMENDED_FOR_VOLUMES``): the API
    picks by the operator's output shape, the README's table says both."""
    from recon.operators import CartesianMRI
    from recon.samplers.registry import RECOMMENDED, RECOMMENDED_FOR_VOLUMES, markdown_table

    assert recommended_method("mri") == RECOMMENDED["mri"] != RECOMMENDED_FOR_VOLUMES["mri"]
    assert recommended_method("mri", volume=True) == RECOMMENDED_FOR_VOLUMES["mri"]
    assert recommended_method("ct", volume=True) == recommended_method("ct")  # no CT override
    table = markdown_table()
    assert f"| `{RECOMMENDED_FOR_VOLUMES['mri']}` |" in table and "MRI volumes |" in table
    g = torch.Generator().manual_seed(0)
    volume_op = CartesianMRI((4, 8, 8), acceleration=2, seed=0)
    y = volume_op.A(torch.rand(1, 2, 4, 8, 8, generator=g))
    res = recon.reconstruct(volume_op, y, sigma_y=0.01, steps=5)  # no prior needed: the volume default is TV
    assert res.info["method"] == RECOMMENDED_FOR_VOLUMES["mri"] and res.x.shape == (1, 2, 4, 8, 8)
    image_op = CartesianMRI((8, 8), acceleration=2, seed=0)
    with pytest.raises(OptionError, match=f"method '{RECOMMENDED['mri']}' needs a prior"):  # an image: not TV
        recon.reconstruct(image_op, image_op.A(torch.rand(1, 2, 8, 8, generator=g)), sigma_y=0.01)


def test_uncertainty_without_a_method_wraps_only_methods_that_sample_from_a_prior():
    from recon.samplers.registry import spread_method

    assert spread_method("hybrid") == ("ensemble", {"base": "hybrid"})
    assert spread_method("pigdm") == ("ensemble", {"base": "pigdm"})
    for name in ("tv", "analytic", "fps", "tempered-smc", "ensemble"):  # nothing to sample, or a spread already
        assert spread_method(name) == (name, {})
        assert spread_method(name, "ct") == (name, {})


def test_uncertainty_on_mri_samples_the_modalitys_spread_method_not_tv():
    """MRI volumes' recommended TV has nothing to sample: their uncertainty maps come from the hybrid's ensemble; a
    named prior-free method other than a recommended one (the analytic inverse of measured k-space) stays as it is."""
    from recon.samplers.registry import RECOMMENDED_FOR_VOLUMES, SPREAD_BY_MODALITY, spread_method

    assert RECOMMENDED_FOR_VOLUMES["mri"] == "tv" and SPREAD_BY_MODALITY["mri"] == "hybrid"
    assert spread_method("tv", "mri") == ("ensemble", {"base": "hybrid"})
    assert spread_method("analytic", "mri") == ("analytic", {})
    assert spread_method("hybrid", "mri") == ("ensemble", {"base": "hybrid"})


def test_sampler_settings_are_the_base_samplers_options_as_the_run_used_them():
    from recon.samplers.hybrid import sample_hybrid
    from recon.samplers.registry import sampler_settings

    defaults = {k: p.default for k, p in inspect.signature(sample_hybrid).parameters.items()
                if isinstance(p.default, (bool, int, float, str)) and k not in COMMON_ARGUMENTS}
    ensemble = {"method": "ensemble", "base": "hybrid", "options": {"base": "hybrid"}}
    assert sampler_settings(ensemble) == defaults  # an ensemble is described by its base sampler's options
    given = {**ensemble, "options": {"base": "hybrid", "admm_penalty": 6.0}}
    assert sampler_settings(given) == {**defaults, "admm_penalty": 6.0}
    # a run's own record (resolved per-case values such as the operator norm are not options) gives the same
    run = {"method": "hybrid", "options": {**defaults, "operator_norm": 3.2, "tv_weight": 12.0, "sigma_y": 0.1}}
    assert sampler_settings(run) == defaults
    assert sampler_settings({"method": "not-a-method"}) == {}


def test_a_modalitys_tuned_options_fill_in_what_the_caller_did_not_give():
    """The hybrid's MRI values (``TUNED_OPTIONS``, chosen on MRI tuning frames) apply to MRI operators, directly and
    inside an ensemble; a caller's own value wins; CT keeps the function's defaults."""
    from recon.priors.gaussian import GaussianPrior
    from recon.samplers.hybrid import sample_hybrid
    from recon.samplers.registry import TUNED_OPTIONS, modality_options, sampler_settings

    tuned = TUNED_OPTIONS["mri"]["hybrid"]
    defaults = inspect.signature(sample_hybrid).parameters
    assert any(defaults[k].default != v for k, v in tuned.items())  # a tuned value differs from the default
    prior = GaussianPrior(torch.zeros(1, 8, 8), torch.ones(1, 8, 8))
    mri, ct = CartesianMRI((8, 8), acceleration=2, real_input=True), ParallelBeamCT((8, 8), angles=6)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for physics, want in ((mri, tuned), (ct, {k: defaults[k].default for k in tuned})):
        y = physics.A(x)
        res = recon.reconstruct(physics, y, prior, "hybrid", sigma_y=0.01, steps=3, particles=1)
        assert {k: res.info["options"][k] for k in tuned} == want
        ens = recon.reconstruct(physics, y, prior, "ensemble", sigma_y=0.01, steps=3, particles=2, base="hybrid")
        assert {k: sampler_settings(ens.info)[k] for k in tuned} == want
    res = recon.reconstruct(mri, mri.A(x), prior, "hybrid", sigma_y=0.01, steps=3, particles=1, anchor=0.5)
    assert res.info["options"]["anchor"] == 0.5 and res.info["options"]["tv_factor"] == tuned["tv_factor"]
    assert modality_options("dps", "mri", {"zeta": 1.0}) == {"zeta": 1.0}  # a method without tuned values


def test_the_ensembles_own_defaults_are_the_configuration_the_priors_calibrations_are_fitted_for():
    """``--method ensemble`` alone runs what ``--uncertainty`` runs: the recommended method's ensemble, of
    ``UNCERTAINTY_SAMPLES`` runs (so that a shipped calibration applies to it)."""
    from recon.samplers.ensemble import sample_ensemble
    from recon.samplers.registry import UNCERTAINTY_SAMPLES, spread_method

    params = inspect.signature(sample_ensemble).parameters
    for modality in ("ct", "mri", "image"):
        assert spread_method(recommended_method(modality), modality) == ("ensemble", {"base": params["base"].default})
    assert spread_method(recommended_method("mri", volume=True), "mri")[1]["base"] == params["base"].default
    assert params["particles"].default == UNCERTAINTY_SAMPLES
