"""Static checks of docker/Dockerfile against setup.py (no docker engine needed): the GPU image
installs this package with the extras it needs, every GPU package gets in and can build, NVIDIA
apex comes from its own git source and never the unrelated PyPI 'apex', the base image is a
CUDA image whose version matches torch's CUDA wheels, torch is a pinned release that has the
grouped GEMM the MoE experts call (torch.nn.functional.grouped_mm, torch >= 2.10) from an index
that publishes it and stays that release through the later installs, and the faiss left in the
image is a GPU package published for the image's CUDA (both also asserted inside the build)."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SETUP = ROOT / "setup.py"
GPU_IMAGE_EXTRAS = {"gpu", "ray", "retrieval"}

# pip options that take a value (the value is not a requirement)
PIP_VALUE_OPTS = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "--config-settings",
    "-C",
    "--global-option",
    "--build-option",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--src",
    "--upgrade-strategy",
    "--platform",
    "--python-version",
    "--implementation",
    "--abi",
    "--progress-bar",
    "--trusted-host",
}


def norm_name(req: str) -> str:
    """PEP 503 name of a requirement string: 'ray[default,train]>=2' -> 'ray'."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, f"not a requirement: {req!r}"
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def setup_kwargs() -> dict:
    tree = ast.parse(SETUP.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {
                kw.arg: ast.literal_eval(kw.value)
                for kw in node.keywords
                if kw.arg in ("name", "install_requires", "extras_require")
            }
    raise AssertionError("no setup(...) call in setup.py")


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    out, buf = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        kw, _, args = buf.partition(" ")
        out.append((kw.upper(), args.strip()))
        buf = ""
    return out


def shell_commands() -> list[tuple[int, dict, list[str]]]:
    """(RUN index, env assignments, argv) for every simple command of every RUN."""
    cmds = []
    for i, (kw, args) in enumerate(instructions()):
        if kw != "RUN":
            continue
        tokens = shlex.split(args, posix=True)
        cur: list[str] = []
        for tok in tokens + ["&&"]:
            if tok in ("&&", "||", ";"):
                if cur:
                    env = {}
                    while cur and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0]):
                        k, _, v = cur.pop(0).partition("=")
                        env[k] = v
                    if cur:
                        cmds.append((i, env, cur))
                cur = []
            else:
                cur.append(tok)
    return cmds


def pip_installs() -> list[dict]:
    """Every `pip install` (pip, pip3, python -m pip): its options, requirements and editable paths."""
    found = []
    for run_idx, env, argv in shell_commands():
        try:
            p = next(
                k
                for k, t in enumerate(argv)
                if re.fullmatch(r"(.*/)?pip3?", t) or (t == "pip" and k > 0 and argv[k - 1] == "-m")
            )
        except StopIteration:
            continue
        if len(argv) <= p + 1 or argv[p + 1] != "install":
            continue
        opts, reqs, editable, it = [], [], [], iter(argv[p + 2 :])
        for tok in it:
            if tok in ("-e", "--editable"):
                editable.append(next(it))
            elif tok.startswith("-"):
                opts.append(tok)
                if tok in PIP_VALUE_OPTS:
                    opts.append(next(it))
            else:
                reqs.append(tok)
        found.append({"run": run_idx, "env": env, "opts": opts, "reqs": reqs, "editable": editable, "argv": argv})
    return found


def local_extras(target: str) -> set[str] | None:
    """'.[a,b]' / '/opt/x[a]' -> {'a', 'b'} when target is this repo's source tree, else None."""
    m = re.fullmatch(r"(\.|\./|/opt/aion-train|/opt/aion-train/)(\[([^\]]*)\])?", target)
    if not m:
        return None
    return {e.strip() for e in (m.group(3) or "").split(",") if e.strip()}


def package_install() -> dict:
    for inst in pip_installs():
        for target in inst["editable"] + inst["reqs"]:
            extras = local_extras(target)
            if extras is not None:
                return {**inst, "extras": extras}
    raise AssertionError("the Dockerfile never pip-installs this package ('.' or '-e .[...]')")


def explicit_names() -> dict[str, list[dict]]:
    """Requirement name -> the pip installs that name it (local paths and VCS URLs left out)."""
    names: dict[str, list[dict]] = {}
    for inst in pip_installs():
        for req in inst["reqs"]:
            if local_extras(req) is not None or req.startswith((".", "/", "git+", "http")):
                continue
            names.setdefault(norm_name(req), []).append(inst)
    return names


def test_dockerfile_parser_sees_the_instructions():
    kws = [kw for kw, _ in instructions()]
    assert kws[0] == "FROM" and "RUN" in kws and "COPY" in kws
    assert norm_name("ray[default,train]") == "ray" and norm_name("Flash_Attn>=2") == "flash-attn"
    assert local_extras(".[ray,gpu]") == {"ray", "gpu"} and local_extras("torch") is None


def test_base_image_is_a_cuda_devel_image():
    kw, image = instructions()[0]
    assert kw == "FROM"
    ref = image.split()[0]
    assert re.match(r"(docker\.io/)?nvidia/cuda:\d+\.\d+(\.\d+)?-", ref), f"not a CUDA base image: {ref}"
    # apex and flash-attn compile CUDA extensions: nvcc is only in the -devel images
    assert "devel" in ref, f"{ref}: the CUDA extensions need nvcc (a -devel image)"


def test_torch_wheels_match_the_image_cuda():
    """apex's --cuda_ext build raises when torch.version.cuda differs from nvcc's major.minor."""
    ref = instructions()[0][1].split()[0]
    major, minor = re.search(r":(\d+)\.(\d+)", ref).groups()
    torch_installs = explicit_names().get("torch")
    assert torch_installs, "torch is never installed explicitly (pip would take PyPI's default CUDA build)"
    inst = torch_installs[0]
    url = inst["opts"][inst["opts"].index("--index-url") + 1] if "--index-url" in inst["opts"] else ""
    assert url.rstrip("/").endswith(f"/cu{major}{minor}"), f"torch from {url!r} on a CUDA {major}.{minor} image"


def test_package_installed_with_every_gpu_image_extra():
    extras = setup_kwargs()["extras_require"]
    assert GPU_IMAGE_EXTRAS <= set(extras), f"setup.py lacks extras {GPU_IMAGE_EXTRAS - set(extras)}"
    inst = package_install()
    assert GPU_IMAGE_EXTRAS <= inst["extras"], f"the image installs extras {inst['extras']}, needs {GPU_IMAGE_EXTRAS}"
    assert set(inst["extras"]) <= set(extras), f"unknown extras {inst['extras'] - set(extras)}"


def test_every_gpu_package_is_installed():
    gpu = {norm_name(r) for r in setup_kwargs()["extras_require"]["gpu"]}
    via_extras = set()
    for extra in package_install()["extras"]:
        via_extras |= {norm_name(r) for r in setup_kwargs()["extras_require"].get(extra, [])}
    missing = gpu - via_extras - set(explicit_names())
    assert not missing, f"gpu packages the image never installs: {sorted(missing)}"


def test_flash_attn_builds_against_the_installed_torch():
    """flash-attn's setup.py imports torch: in pip's isolated build env it fails with
    "No module named 'torch'", so it must be built with --no-build-isolation after torch."""
    gpu = {norm_name(r) for r in setup_kwargs()["extras_require"]["gpu"]}
    if "flash-attn" not in gpu:
        pytest.skip("no flash-attn in the gpu extra")
    runs = [i["run"] for i in explicit_names().get("torch", [])]
    fa = [i for i in explicit_names().get("flash-attn", []) if "--no-build-isolation" in i["opts"]]
    pkg = package_install()
    if "--no-build-isolation" not in pkg["opts"]:
        assert fa, "flash-attn is only installed through the extras, in an isolated build without torch"
        assert fa[0]["run"] < pkg["run"], "flash-attn must be built before the extras ask for it"
    first = fa[0]["run"] if fa else pkg["run"]
    assert runs and min(runs) < first, "torch must be installed before flash-attn is built"


def test_faiss_gpu_is_the_faiss_left_in_the_image():
    """faiss-cpu (retrieval) and faiss-gpu (gpu) both install the `faiss` module; with both
    extras the image must end with faiss-gpu's files, not whichever pip happened to write last."""
    extras = setup_kwargs()["extras_require"]
    inst = package_install()
    names = set()
    for extra in inst["extras"]:
        names |= {norm_name(r) for r in extras.get(extra, [])}
    if not {"faiss-cpu", "faiss-gpu"} <= names:
        pytest.skip("the image does not get both faiss builds")
    cmds = shell_commands()
    removed = [i for i, _, argv in cmds if "uninstall" in argv and "faiss-cpu" in argv and i >= inst["run"]]
    assert removed, "faiss-cpu is never removed after the extras install"
    again = [
        i for i in explicit_names().get("faiss-gpu", []) if i["run"] >= removed[0] and "--force-reinstall" in i["opts"]
    ]
    assert again, "faiss-gpu is not reinstalled after faiss-cpu's removal (which deletes the shared files)"


def test_apex_is_nvidia_apex_built_from_git_source():
    cmds = shell_commands()
    clones = [
        (i, argv)
        for i, _, argv in cmds
        if argv[:2] == ["git", "clone"]
        and any(re.fullmatch(r"https://github\.com/NVIDIA/apex(\.git)?/?", a) for a in argv)
    ]
    vcs = [
        inst
        for inst in pip_installs()
        if any(re.match(r"git\+https://github\.com/NVIDIA/apex(\.git)?(@|$)", r) for r in inst["reqs"])
    ]
    assert clones or vcs, "NVIDIA apex is not built from https://github.com/NVIDIA/apex"
    if clones:
        run, argv = clones[0]
        dest = [a for a in argv[2:] if not a.startswith("-") and "github.com" not in a and not a.isdigit()]
        dest = dest[0] if dest else "apex"
        builds = [
            inst
            for inst in pip_installs()
            if inst["run"] == run and (any(r in (".", "./", dest, dest + "/") for r in inst["reqs"]))
        ]
        assert builds, f"apex is cloned to {dest} but that checkout is never pip-installed"
        build = builds[0]
    else:
        build = vcs[0]
    # apex's setup.py imports torch and compiles against it: no isolated build env
    assert "--no-build-isolation" in build["opts"], "apex is built in an isolated env without torch"
    cuda_ext = (
        "--build-option=--cuda_ext" in build["opts"]
        or "--global-option=--cuda_ext" in build["opts"]
        or build["env"].get("APEX_CUDA_EXT") == "1"
    )
    assert cuda_ext, "apex is built without its CUDA extensions"
    torch_runs = [i["run"] for i in explicit_names().get("torch", [])]
    assert torch_runs and min(torch_runs) < build["run"], "apex must be built after torch"


def test_pypi_apex_is_never_installed():
    """PyPI's 'apex' is an unrelated Pyramid toolkit: neither the Dockerfile nor setup.py may ask for it."""
    assert "apex" not in explicit_names(), "the Dockerfile pip-installs PyPI's 'apex'"
    kw = setup_kwargs()
    reqs = list(kw.get("install_requires", []))
    for extra_reqs in kw.get("extras_require", {}).values():
        reqs += extra_reqs
    assert "apex" not in {norm_name(r) for r in reqs}, "setup.py depends on PyPI's 'apex'"


def test_cuda_extensions_target_current_gpus():
    """`docker build` has no GPU, so extension builds cross-compile for TORCH_CUDA_ARCH_LIST;
    without it apex falls back to pre-Ampere targets."""
    env_text = " ".join(args for kw, args in instructions() if kw in ("ENV", "ARG"))
    m = re.search(r'TORCH_CUDA_ARCH_LIST="?([0-9.;+ PTX]+)"?', env_text)
    assert m, "TORCH_CUDA_ARCH_LIST is not set for the CUDA extension builds"
    archs = {a.replace("+PTX", "").strip() for a in m.group(1).split(";")}
    assert {"8.0", "9.0"} <= archs, f"no A100 (8.0) / H100 (9.0) target in {sorted(archs)}"


# --------------------------------------------------------------------------- grouped GEMM, faiss for GPUs

# torch builds published per CUDA wheel index (the PyTorch release compatibility matrix); a
# version missing here must be looked up before the image moves to it
TORCH_CUDA_INDEXES = {"2.13": {"cu126", "cu130", "cu132"}, "2.14": {"cu126", "cu130", "cu132"}}
# torch.nn.functional.grouped_mm, what aion_train/model/moe/experts.py calls, is public from 2.10
GROUPED_MM_SINCE = (2, 10)
# GPU faiss packages on PyPI: (first version built for CUDA 12, CUDA major, lowest CUDA runtime)
FAISS_GPU_PACKAGES = {"faiss-gpu": ((1, 14, 3), 12, (12, 6)), "faiss-gpu-cu12": ((1, 8, 0), 12, (12, 1))}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def _pinned(inst: dict, name: str) -> str | None:
    for req in inst["reqs"]:
        if norm_name(req) == name:
            m = re.search(r"==\s*([0-9][0-9a-zA-Z.+]*)", req)
            return m.group(1) if m else None
    return None


def _image_cuda() -> tuple[int, int]:
    ref = instructions()[0][1].split()[0]
    major, minor = re.search(r":(\d+)\.(\d+)", ref).groups()
    return int(major), int(minor)


def test_torch_is_a_pinned_build_with_the_grouped_gemm():
    """The image's torch must have torch.nn.functional.grouped_mm (torch >= 2.10; bf16 on
    compute capability >= 8.0, the CUTLASS kernel on sm90), from a CUDA index that publishes it."""
    inst = explicit_names()["torch"][0]
    version = _pinned(inst, "torch")
    assert version, f"torch is installed unpinned ({inst['reqs']}): the index's newest may lack the op or the CUDA"
    assert _version_tuple(version) >= GROUPED_MM_SINCE, f"torch {version} has no torch.nn.functional.grouped_mm"
    index = inst["opts"][inst["opts"].index("--index-url") + 1].rstrip("/").rsplit("/", 1)[-1]
    minor = ".".join(version.split(".")[:2])
    assert minor in TORCH_CUDA_INDEXES, f"look up which CUDA indexes publish torch {minor} and add it here"
    assert index in TORCH_CUDA_INDEXES[minor], f"torch {version} is not published on the {index} index"
    # this machine's torch, when it is the same release, really has the op
    import torch
    import torch.nn.functional as F

    if torch.__version__.split("+")[0] == version:
        assert hasattr(F, "grouped_mm"), f"torch {version} lacks torch.nn.functional.grouped_mm"
    # and the build checks it right after installing torch
    checks = [i for i, _, argv in shell_commands() if argv[:2] == ["python3", "-c"] and "grouped_mm" in argv[2]]
    assert checks and checks[0] > inst["run"], "the image never checks that torch has grouped_mm"


def test_later_installs_keep_the_pinned_torch():
    """The extras (and flash-attn's build) must not replace the CUDA 12.6 torch: a requirement
    admitting a newer torch would pull PyPI's default build (CUDA 13)."""
    version = _pinned(explicit_names()["torch"][0], "torch")
    writes = {}
    for kw, args in instructions():
        if kw == "RUN":
            for m in re.finditer(r"echo\s+\"?torch==([0-9][^\"\s]*)\"?\s*>\s*(\S+)", args):
                writes[m.group(2)] = m.group(1)
    for inst in [package_install()] + explicit_names().get("flash-attn", []):
        opts = inst["opts"]
        assert "-c" in opts or "--constraint" in opts, f"{' '.join(inst['argv'])}: no torch constraint"
        path = opts[(opts.index("-c") if "-c" in opts else opts.index("--constraint")) + 1]
        assert writes.get(path) == version, f"{path} does not pin torch=={version} ({writes})"


def test_faiss_gpu_package_exists_for_the_image_cuda():
    """The faiss left in the image is a GPU build published for the image's CUDA (faiss-gpu
    1.7.2, what an unpinned name could resolve to on Python 3.10, is a CUDA 11 build)."""
    cuda = _image_cuda()
    gpu_installs = [
        (name, inst)
        for name in FAISS_GPU_PACKAGES
        for inst in explicit_names().get(name, [])
        if "--force-reinstall" in inst["opts"] or name != "faiss-gpu"
    ]
    assert gpu_installs, "no GPU faiss package is installed explicitly"
    name, inst = gpu_installs[-1]
    version = _pinned(inst, name)
    first, major, runtime = FAISS_GPU_PACKAGES[name]
    assert version, f"{name} is installed unpinned"
    assert _version_tuple(version) >= first, f"{name} {version} predates its CUDA {major} builds ({first})"
    assert cuda[0] == major and cuda >= runtime, f"{name} {version} needs CUDA {runtime}+, image has {cuda}"
    checks = [
        i for i, _, argv in shell_commands() if argv[:2] == ["python3", "-c"] and "StandardGpuResources" in argv[2]
    ]
    assert checks and checks[-1] > inst["run"], "the image never checks that faiss is the GPU build"
