"""Device profiles: every shipped file loads, bad ones fail cleanly, they apply as documented."""

import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from edgetrain.cli import app
from edgetrain.config import FitConfig
from edgetrain.errors import UserInputError
from edgetrain.hardware.machine import Gpu, MachineInfo
from edgetrain.hardware.profiles import (
    CACHE_DTYPES,
    DEVICE_TYPES,
    apply_profile,
    is_simulated,
    list_profiles,
    load_profile,
)
from edgetrain.units import MemorySize

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "laptop-gpu-4gb",
            "laptop-gpu-8gb", "raspberry-pi-5-8gb", "generic-cpu"}
GOOD = (REPO / "devices" / "generic-cpu.toml").read_text()


def machine(board=None, cpu="AMD EPYC", memory=24 * 2**30, gpus=()):
    return MachineInfo(cpu=cpu, board=board, memory_bytes=memory, gpus=tuple(gpus),
                       platform="Linux", python="3.11", torch="2.14.1")


def invoke(*args):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_every_shipped_profile_parses_with_its_fields():
    profiles = {p.name: p for p in list_profiles()}
    assert REQUIRED <= set(profiles)
    assert {p.stem for p in (REPO / "devices").glob("*.toml")} == set(profiles)
    for p in profiles.values():
        assert p.path.stem == p.name
        assert p.device in DEVICE_TYPES and p.cache_dtype in CACHE_DTYPES
        assert 0 < p.memory_budget_bytes < p.total_memory_bytes
        assert p.description and p.budget_reason and p.cache_dtype_reason and p.torch_install
    # The budgets the profiles explain: shared RAM minus the OS and a margin (framework inside).
    assert profiles["jetson-nano-4gb"].memory_budget_bytes == 3_200_000_000
    assert profiles["laptop-gpu-4gb"].memory_budget_bytes == 3 * 2**30
    assert all(profiles[n].unified_memory for n in REQUIRED if "laptop" not in n)
    assert not profiles["laptop-gpu-8gb"].unified_memory
    assert profiles["raspberry-pi-5-8gb"].device == "cpu"
    assert "torch==2.9.1" in profiles["raspberry-pi-5-8gb"].torch_install


def test_cache_dtypes_match_the_cache_module():
    from edgetrain.cache import CACHE_DTYPES as CACHE_MODULE_DTYPES

    assert set(CACHE_DTYPES) == set(CACHE_MODULE_DTYPES)


def test_devices_command_lists_every_profile():
    result = invoke("devices")
    assert result.exit_code == 0, result.output
    for name in REQUIRED:
        assert name in result.output
    assert "simulated" in result.output  # no Jetson here


def test_devices_command_shows_one_profile():
    result = invoke("devices", "jetson-orin-nano-8gb")
    assert result.exit_code == 0, result.output
    assert "why that budget" in result.output and "jetson-ai-lab" in result.output


@pytest.mark.parametrize("args", [
    ["devices", "jetson-nano-9000"],
    ["bench", "run", "--device-profile", "jetson-nano-9000", "--dry-run"],
])
def test_unknown_profile_is_a_clean_error(args, tmp_path):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "jetson-nano-9000" in result.output and "jetson-orin-nano-8gb" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(UserInputError, match="--device-profile"):
        load_profile("jetson-nano-9000")


def test_malformed_profile_names_file_and_fields(tmp_path, monkeypatch):
    broken = GOOD.replace('name = "generic-cpu"', 'name = "broken"')
    broken = broken.replace('memory_budget = "4.5GB"', "").replace('"8GB"', '"lots"')
    broken = broken.replace('cache_dtype = "float32"', 'cache_dtype = "int8"')
    (tmp_path / "broken.toml").write_text(broken)
    (tmp_path / "syntax.toml").write_text("name = 'syntax\n")
    monkeypatch.setenv("EDGETRAIN_DEVICES_DIR", str(tmp_path))
    with pytest.raises(UserInputError) as err:
        load_profile("broken")
    message = str(err.value)
    assert str(tmp_path / "broken.toml") in message
    # Every problem at once, each naming its field.
    assert "'memory_budget' is missing" in message
    assert "field 'total_memory' 'lots' is not a memory size" in message
    assert "'cache_dtype' is 'int8'" in message
    with pytest.raises(UserInputError, match="syntax.toml is not valid TOML"):
        load_profile("syntax")
    result = invoke("bench", "run", "--device-profile", "broken", "--dry-run")
    assert result.exit_code == 2 and "broken.toml" in result.output, result.output
    assert "Traceback" not in result.output
    (tmp_path / "broken.toml").write_text(GOOD.replace('"4.5GB"', '"2 potatoes"'))
    with pytest.raises(UserInputError, match="'memory_budget' '2 potatoes' is not a memory size"):
        load_profile(str(tmp_path / "broken.toml"))

def test_a_profile_in_the_env_folder_wins_over_the_shipped_one(tmp_path, monkeypatch):
    (tmp_path / "generic-cpu.toml").write_text(GOOD.replace('"4.5GB"', '"3GB"'))
    monkeypatch.setenv("EDGETRAIN_DEVICES_DIR", str(tmp_path))
    assert load_profile("generic-cpu").memory_budget_text == "3GB"
    assert load_profile(str(REPO / "devices" / "generic-cpu.toml")).memory_budget_text == "4.5GB"


def test_apply_profile_respects_explicit_flags():
    nano = load_profile("jetson-nano-4gb")
    config = FitConfig(cache_dtype="bfloat16", device="cpu",
                       memory_budget=MemorySize.parse("1GB"))
    applied = apply_profile(config, nano, explicit=set())
    assert (applied.memory_budget.bytes, str(applied.memory_budget)) == (3_200_000_000, "3.2GB")
    assert applied.cache_dtype == "float16" and applied.device == "cuda"
    assert applied.extra == {"device_profile": "jetson-nano-4gb", "simulated": False}
    kept = apply_profile(config, nano, explicit={"cache_dtype", "device", "memory_budget"})
    assert (kept.cache_dtype, kept.device, kept.memory_budget.bytes) == ("bfloat16", "cpu", 10**9)
    assert str(kept.memory_budget) == "1GB" and kept.extra["device_profile"] == "jetson-nano-4gb"
    # Simulated: the budget applies, but a Jetson's cuda is not forced onto this machine.
    simulated = apply_profile(FitConfig(), nano, set(), simulated=True)
    assert simulated.device == "auto" and simulated.memory_budget.bytes == 3_200_000_000
    assert simulated.extra["simulated"] is True
    pi = apply_profile(FitConfig(), load_profile("raspberry-pi-5-8gb"), set(), simulated=True)
    assert pi.device == "cpu" and pi.cache_dtype == "bfloat16"
    assert applied.validate() is applied


def test_is_simulated_tells_devices_apart():
    orin_nano = machine(board="NVIDIA Jetson Orin Nano Developer Kit", cpu="ARMv8",
                        memory=int(7.4 * 2**30))
    assert not is_simulated(load_profile("jetson-orin-nano-8gb"), orin_nano)
    assert is_simulated(load_profile("jetson-nano-4gb"), orin_nano)
    assert is_simulated(load_profile("jetson-agx-orin-64gb"), orin_nano)
    small_orin = machine(board="NVIDIA Jetson Orin Nano Developer Kit", memory=int(3.5 * 2**30))
    assert is_simulated(load_profile("jetson-orin-nano-8gb"), small_orin)  # the 4 GB module
    pi = machine(board="Raspberry Pi 5 Model B Rev 1.0", memory=int(7.9 * 2**30))
    assert not is_simulated(load_profile("raspberry-pi-5-8gb"), pi)
    laptop = machine(gpus=[Gpu("NVIDIA GeForce RTX 3050 Laptop GPU", 4 * 2**30)])
    assert not is_simulated(load_profile("laptop-gpu-4gb"), laptop)
    assert is_simulated(load_profile("laptop-gpu-8gb"), laptop)
    assert is_simulated(load_profile("laptop-gpu-4gb"), machine(gpus=[Gpu("NVIDIA H100", None)]))
    for m in (orin_nano, pi, laptop, machine()):
        assert not is_simulated(load_profile("generic-cpu"), m)


def test_fit_style_wiring_lets_explicit_flags_win():
    """What `edgetrain fit --device-profile` does (cli.bench.with_device_profile), on a small
    command with fit's option names."""
    from edgetrain.cli.bench import with_device_profile

    seen = {}
    mini = typer.Typer()

    @mini.command()
    def fit(ctx: typer.Context, cache_dtype: str = "float32", device: str = "auto",
            device_profile: str = "") -> None:
        config = FitConfig(cache_dtype=cache_dtype, device=device)
        seen["config"] = with_device_profile(config, device_profile, ctx)

    result = CliRunner().invoke(mini, ["--cache-dtype", "float32", "--device-profile",
                                       "jetson-orin-nano-8gb"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert config.cache_dtype == "float32"  # given on the command line: the user wins
    assert str(config.memory_budget) == "6.5GB" and config.device == "auto"  # simulated here
    assert config.extra == {"device_profile": "jetson-orin-nano-8gb", "simulated": True}


def test_packaging_ships_profiles_when_pyproject_maps_them():
    """If pyproject lists packages explicitly (to map devices/ into the wheel), every package
    must be in that list, or a wheel silently lacks it."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    if "edgetrain._devices" not in setuptools.get("package-dir", {}):
        pytest.skip("pyproject does not package devices/ yet (see edgetrain/shipped.py)")
    packages = set(setuptools["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts)
             for p in (REPO / "edgetrain").rglob("__init__.py")}
    assert found <= packages
    assert {"edgetrain._devices", "edgetrain._presets"} <= packages
