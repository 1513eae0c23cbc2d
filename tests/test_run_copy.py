"""A finished run directory survives a copy that does not keep modification times (`cp -r`, scp).

Model folders are fingerprinted by content, hashed once when their stage finished (the manifest's
`content`), so a copy is `done` for every stage; a copy with one weight byte altered is stale from
the stage that reads it, and the refusal names the changed folder once.
"""

import json
import subprocess

import yaml

from constitutional.cli import main

from conftest import cai_error_line, tiny_config_data


def test_a_cp_r_copy_of_a_run_is_done_and_an_altered_weight_makes_it_stale(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config_data(tiny_model_dir, tmp_path, critique={"rounds": 1})))
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    stages = ["--stages", "critique,sl,pairs"]
    assert main(["run", str(config), "--run-dir", str(run_dir), *stages]) == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    weights = manifest["stages"]["sl"]["content"]["sl_cai"]["model.safetensors"]
    assert len(weights[2]) == 64  # size, time and SHA-256 of each file, recorded once
    subprocess.run(["cp", "-r", str(run_dir), str(copy)], check=True)  # new modification times
    weight_file = copy / "models" / "sl-cai" / "model.safetensors"
    assert weight_file.stat().st_mtime_ns != weights[1]
    capsys.readouterr()
    assert main(["run", str(config), "--run-dir", str(copy), *stages]) == 0
    log = capsys.readouterr()
    assert "would run again" not in log.err and "changed" not in log.err
    entries = json.loads((copy / "manifest.json").read_text())["stages"]
    assert {name: entries[name]["ended"] for name in ("critique", "sl", "pairs")} == {
        name: manifest["stages"][name]["ended"] for name in ("critique", "sl", "pairs")
    }  # nothing ran again
    data = bytearray(weight_file.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights, same size
    weight_file.write_bytes(bytes(data))
    assert main(["run", str(config), "--run-dir", str(copy), "--stages", "critique,sl,pairs,feedback"]) == 2
    line = cai_error_line(capsys.readouterr().err)
    assert "models/sl-cai changed" in line and line.count("models/sl-cai changed") == 1, line
    assert line.endswith("or use another --run-dir") and "stages that would run again: pairs" in line
