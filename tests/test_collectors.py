"""The host facts an engine schedules on (agent/collectors): every parser on fixture
strings and /sys-like trees, the collectors against this machine's /proc and /sys, and
the libvirt-based ones against libvirt's test driver and a real QEMU driver."""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent import collectors, config, report
from agent.collectors import Context, cpu, kvm, memory, numa, pci, storage
from agent.local_libvirt import LocalLibvirt

FIXTURES = Path(__file__).parent / "fixtures" / "collectors"
DOMCAPS = (FIXTURES / "domcapabilities-kvm-x86_64.xml").read_text()


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def run(name: str, ctx: Context) -> dict[str, Any]:
    result = collectors.run_all(ctx)[name]
    assert result["ok"], result["error"]
    return result["data"]  # type: ignore[no-any-return]


@pytest.fixture
def test_driver() -> Iterator[LocalLibvirt]:
    local = LocalLibvirt("test:///default", on_change=lambda: None)
    yield local
    local.close()


# --- kvm ---------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "vendor"), [({"vmx", "sse"}, "intel"), ({"svm"}, "amd"),
                                               ({"sse"}, "")])
def test_kvm_vendor_from_the_cpu_flag(flags: set[str], vendor: str) -> None:
    facts = kvm.assess(flags, device_usable=True, device_exists=True, module=None, nested=None)
    assert facts["vendor"] == vendor


def test_kvm_collector_on_a_tree_amd_loaded_but_no_device(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc/cpuinfo": "processor\t: 0\nflags\t\t: fpu svm lm\n",
                          "sys/module/kvm_amd/parameters/nested": "1\n"})
    (tmp_path / "dev").mkdir()
    facts = kvm.collect(Context(proc=tmp_path / "proc", sys=tmp_path / "sys", dev=tmp_path / "dev"))
    assert facts["vendor"] == "amd" and facts["module"] == "kvm_amd" and facts["nested"]
    assert not facts["usable"] and not facts["disabled_in_bios"] and "/dev/kvm" in facts["problem"]


def test_kvm_vendor_matches_this_machines_cpuinfo() -> None:
    flags = set(re.findall(r"\b(vmx|svm)\b", Path("/proc/cpuinfo").read_text()))
    expected = "intel" if "vmx" in flags else "amd" if "svm" in flags else ""
    assert run("kvm", Context())["vendor"] == expected


# --- cpu ---------------------------------------------------------------------------

def test_guest_cpu_models_from_real_domain_capabilities() -> None:
    facts = cpu.parse_domain_cpu_models(DOMCAPS)
    usable = re.findall(r"<model usable='yes'[^>]*>([^<]+)</model>", DOMCAPS)
    assert facts["guest_models"] == usable and "pentium3" in usable
    assert "qemu64" not in facts["guest_models"]  # usable='no' in the fixture
    assert facts["host_model"] == "kvm64"
    assert facts["guest_modes"] == ["custom", "host-model", "host-passthrough", "maximum"]


@pytest.mark.parametrize("xml", [
    "<domainCapabilities><cpu><mode name='custom' supported='no'>"
    "<model usable='yes'>EPYC</model></mode><mode name='host-model' supported='no'>"
    "<model>EPYC</model></mode></cpu></domainCapabilities>",
    "<domainCapabilities><path>/usr/bin/qemu</path></domainCapabilities>",
])
def test_guest_cpu_models_absent_when_libvirt_supports_no_mode(xml: str) -> None:
    assert cpu.parse_domain_cpu_models(xml) == {"guest_models": [], "host_model": "",
                                                "guest_modes": []}


def test_cpu_collector_on_this_machine_agrees_with_host_and_reports_libvirt_apart(
        test_driver: LocalLibvirt) -> None:
    facts = run("cpu", Context(libvirt=test_driver))
    host = run("host", Context())
    assert (facts["model"], facts["cores"], facts["threads"]) == (
        host["cpu_model"], host["cpu_cores"], host["cpu_threads"])
    assert facts["threads"] == os.cpu_count() and 1 <= facts["sockets"] <= facts["cores"]
    # The test driver has no domain capabilities: only that part is missing, and says why.
    assert "virConnectGetDomainCapabilities" in facts["models_error"]
    assert facts["guest_models"] == []


def test_cpu_models_from_a_real_qemu_driver(tmp_path: Path) -> None:
    """libvirt's embedded QEMU driver (in this process, no daemon) probes the real QEMU."""
    if not (shutil.which("qemu-system-x86_64") and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        pytest.skip("needs qemu-system-x86_64 and a usable /dev/kvm")
    local = LocalLibvirt(f"qemu:///embed?root={tmp_path / 'embed'}", on_change=lambda: None)
    try:
        facts = run("cpu", Context(libvirt=local))
        conn = local.connection()
        assert conn is not None
        xml = conn.getDomainCapabilities(None, None, None, "kvm", 0)
    finally:
        local.close()
    assert facts["models_error"] is None and facts["guest_models"]
    assert facts["guest_models"] == re.findall(r"<model usable='yes'[^>]*>([^<]+)</model>", xml)
    assert "host-passthrough" in facts["guest_modes"]


# --- memory ------------------------------------------------------------------------

def test_hugepages_parsed_by_page_size() -> None:
    pools = {"hugepages-1048576kB": {"nr_hugepages": "2\n", "free_hugepages": "1\n"},
             "hugepages-2048kB": {"nr_hugepages": "512\n", "free_hugepages": "100\n"},
             "not-a-pool": {"nr_hugepages": "9"}}
    assert memory.parse_hugepages(pools) == [{"size_kib": 2048, "total": 512, "free": 100},
                                             {"size_kib": 1048576, "total": 2, "free": 1}]


def test_memory_collector_on_a_tree(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "proc/meminfo": "MemTotal:       16384 kB\nMemFree:  1024 kB\nMemAvailable:    8192 kB\n",
        "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages": "16\n",
        "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages": "4\n"})
    facts = memory.collect(Context(proc=tmp_path / "proc", sys=tmp_path / "sys"))
    assert facts == {"total": 16 << 20, "free": 8 << 20,
                     "hugepages": [{"size_kib": 2048, "total": 16, "free": 4}]}
    (tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages").unlink()
    shutil.rmtree(tmp_path / "sys/kernel")  # a kernel without hugetlbfs
    assert memory.collect(Context(proc=tmp_path / "proc", sys=tmp_path / "sys"))["hugepages"] == []


def meminfo_number(name: str) -> int:
    """A /proc/meminfo field as the file writes it (kB or a count), read apart from the agent."""
    match = re.search(rf"^{name}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    assert match, name
    return int(match[1])


def test_memory_on_this_machine_matches_proc_meminfo() -> None:
    facts = run("memory", Context())
    total = meminfo_number("MemTotal") * 1024
    assert facts["total"] == total and 0 < facts["free"] <= total
    sizes = sorted(int(p.name[10:-2]) for p in Path("/sys/kernel/mm/hugepages").glob("hugepages-*kB"))
    assert [p["size_kib"] for p in facts["hugepages"]] == sizes
    # The default page size's pool is the one /proc/meminfo counts.
    pool = next(p for p in facts["hugepages"] if p["size_kib"] == meminfo_number("Hugepagesize"))
    assert pool["total"] == meminfo_number("HugePages_Total")


# --- numa --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "cpus"), [("0-3,8-11\n", [0, 1, 2, 3, 8, 9, 10, 11]),
                                            ("0\n", [0]), ("0,2,4-5", [0, 2, 4, 5]), ("\n", [])])
def test_cpulist(text: str, cpus: list[int]) -> None:
    assert numa.parse_cpulist(text) == cpus


def test_node_meminfo() -> None:
    text = ("Node 1 MemTotal:       32768 kB\nNode 1 MemFree:        16384 kB\n"
            "Node 1 HugePages_Total:     8\nNode 1 Active(anon):   12 kB\n")
    assert numa.parse_node_meminfo(text) == {"MemTotal": 32 << 20, "MemFree": 16 << 20,
                                             "HugePages_Total": 8}


def test_numa_collector_on_a_tree_two_nodes_by_id(tmp_path: Path) -> None:
    base = "sys/devices/system/node/"
    files = {base + "possible": "0,10\n", base + "power/x": ""}
    for node, cpulist in ((10, "4-7\n"), (0, "0-3\n")):
        files |= {f"{base}node{node}/cpulist": cpulist,
                  f"{base}node{node}/meminfo": f"Node {node} MemTotal: 2048 kB\n"
                                               f"Node {node} MemFree: 1024 kB\n"}
    files[base + "node10/hugepages/hugepages-2048kB/nr_hugepages"] = "8\n"
    files[base + "node10/hugepages/hugepages-2048kB/free_hugepages"] = "8\n"
    write_tree(tmp_path, files)
    nodes = numa.collect(Context(sys=tmp_path / "sys"))["nodes"]
    assert [(n["id"], n["cpus"], n["memory_total"], n["memory_free"]) for n in nodes] == [
        (0, [0, 1, 2, 3], 2 << 20, 1 << 20), (10, [4, 5, 6, 7], 2 << 20, 1 << 20)]
    assert nodes[0]["hugepages"] == [] and nodes[1]["hugepages"] == [
        {"size_kib": 2048, "total": 8, "free": 8}]


def test_numa_on_this_machine() -> None:
    nodes = run("numa", Context())["nodes"]
    assert nodes and nodes[0]["id"] == 0 and nodes[0]["memory_total"] > 0
    all_cpus = sorted(c for n in nodes for c in n["cpus"])
    if len(nodes) == 1:
        assert all_cpus == list(range(os.cpu_count() or 0))
    assert len(all_cpus) == len(set(all_cpus))  # a CPU is in one node


# --- storage -----------------------------------------------------------------------

def test_storage_usage_as_df_computes_it() -> None:
    st = os.statvfs_result((4096, 1024, 1000, 500, 400, 10, 5, 5, 0, 255))
    assert storage.usage(st) == {"size": 1000 * 1024, "free": 400 * 1024}


def test_storage_paths_and_pools_from_the_test_driver(tmp_path: Path,
                                                      test_driver: LocalLibvirt) -> None:
    facts = run("storage", Context(libvirt=test_driver,
                                   storage_paths=[tmp_path, tmp_path / "missing"]))
    conn = test_driver.connection()
    assert conn is not None
    assert [p["name"] for p in facts["pools"]] == [p.name() for p in conn.listAllStoragePools()]
    assert facts["pools"] and facts["pools"][0]["capacity"] > 0 and facts["pools_error"] is None
    here, missing = facts["paths"]
    disk = shutil.disk_usage(tmp_path)
    assert here["path"] == str(tmp_path) and here["error"] is None and here["size"] == disk.total
    assert abs(here["free"] - disk.free) < 256 << 20  # others write to this disk meanwhile
    assert missing == {"path": str(tmp_path / "missing"), "size": 0, "free": 0,
                       "error": "No such file or directory"}


def test_storage_path_on_a_hung_mount_is_reported_not_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release, calls = threading.Event(), []
    real = os.statvfs

    def hung(path: Any) -> os.statvfs_result:
        calls.append(path)
        release.wait(30)
        return real(path)

    monkeypatch.setattr(storage.os, "statvfs", hung)
    assert "did not return within" in storage.read_path(tmp_path, timeout=0.05)["error"]
    # Still stuck: no second thread piles up on the same path.
    assert "has not returned" in storage.read_path(tmp_path, timeout=0.05)["error"]
    assert len(calls) == 1
    release.set()
    storage._stuck[tmp_path].join(5)
    assert storage.read_path(tmp_path)["error"] is None and len(calls) == 2


# --- pci ---------------------------------------------------------------------------

def pci_tree(root: Path) -> Path:
    devices = root / "bus/pci/devices"
    write_tree(devices, {
        # An NVIDIA T4 with two vGPU profiles, bound to nvidia.
        "0000:3b:00.0/class": "0x030200\n", "0000:3b:00.0/vendor": "0x10de\n",
        "0000:3b:00.0/device": "0x1eb8\n",
        "0000:3b:00.0/mdev_supported_types/nvidia-222/name": "GRID T4-1B\n",
        "0000:3b:00.0/mdev_supported_types/nvidia-222/available_instances": "16\n",
        "0000:3b:00.0/mdev_supported_types/nvidia-222/device_api": "vfio-pci\n",
        "0000:3b:00.0/mdev_supported_types/nvidia-223/available_instances": "0\n",
        "0000:3b:00.0/mdev_supported_types/nvidia-223/device_api": "vfio-pci\n",
        # Intel integrated graphics, no driver bound.
        "0000:00:02.0/class": "0x030000\n", "0000:00:02.0/vendor": "0x8086\n",
        "0000:00:02.0/device": "0x3e92\n",
        # A network card: not a display device.
        "0000:00:03.0/class": "0x020000\n", "0000:00:03.0/vendor": "0x1af4\n",
        "0000:00:03.0/device": "0x1000\n"})
    (root / "bus/pci/drivers/nvidia").mkdir(parents=True)
    (devices / "0000:3b:00.0/driver").symlink_to("../../../bus/pci/drivers/nvidia")
    return root


def test_pci_ids_parsed_only_as_far_as_needed() -> None:
    lines = (FIXTURES / "pci.ids").read_text().splitlines(keepends=True)
    consumed = []

    def reading() -> Iterator[str]:
        for line in lines:
            consumed.append(line)
            yield line

    wanted = {("0x8086", "0x3e92"), ("0x10de", "0x1eb8")}
    vendors, devices = pci.parse_pci_ids(reading(), wanted)
    assert vendors == {"0x8086": "Intel Corporation", "0x10de": "NVIDIA Corporation"}
    assert devices == {("0x8086", "0x3e92"): "CoffeeLake-S GT2 [UHD Graphics 630]",
                       ("0x10de", "0x1eb8"): "TU104GL [Tesla T4]"}
    assert consumed[-1].startswith("\t1eb8") and len(consumed) < len(lines)


def test_pci_display_devices_with_mdev_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pci, "PCI_IDS", (tmp_path / "absent.ids", FIXTURES / "pci.ids"))
    devices = pci.collect(Context(sys=pci_tree(tmp_path)))["devices"]
    assert devices == [
        {"address": "0000:00:02.0", "class": "0x030000", "vendor_id": "0x8086",
         "device_id": "0x3e92", "vendor": "Intel Corporation",
         "model": "CoffeeLake-S GT2 [UHD Graphics 630]", "driver": "", "mdev_types": []},
        {"address": "0000:3b:00.0", "class": "0x030200", "vendor_id": "0x10de",
         "device_id": "0x1eb8", "vendor": "NVIDIA Corporation", "model": "TU104GL [Tesla T4]",
         "driver": "nvidia", "mdev_types": [
             {"name": "GRID T4-1B", "type_id": "nvidia-222", "available_instances": 16,
              "device_api": "vfio-pci"},
             {"name": "nvidia-223", "type_id": "nvidia-223", "available_instances": 0,
              "device_api": "vfio-pci"}]}]


def test_pci_without_pci_ids_names_known_vendors_only(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pci, "PCI_IDS", (tmp_path / "absent.ids",))
    devices = pci.collect(Context(sys=pci_tree(tmp_path)))["devices"]
    assert [(d["vendor"], d["model"]) for d in devices] == [("Intel Corporation", ""),
                                                            ("NVIDIA Corporation", "")]
    assert pci.collect(Context(sys=tmp_path / "nothing"))["devices"] == []  # no PCI bus


def test_pci_on_this_machine_lists_exactly_the_display_class() -> None:
    root = Path("/sys/bus/pci/devices")
    expected = sorted(p.name for p in root.iterdir() if (p / "class").read_text().startswith("0x03"))
    devices = run("pci", Context())["devices"]
    assert [d["address"] for d in devices] == expected
    assert all(re.fullmatch(r"0x[0-9a-f]{4}", d["vendor_id"]) for d in devices)


# --- networks, and libvirt failing alone ---------------------------------------------

def test_networks_from_the_test_driver(test_driver: LocalLibvirt) -> None:
    conn = test_driver.connection()
    assert conn is not None
    # A network libvirt gives no bridge for (hostdev forwarding): bridgeName raises.
    net = conn.networkDefineXML("<network><name>vf-hostdev</name><forward mode='hostdev' "
                                "managed='yes'><pf dev='eth9'/></forward></network>")
    try:
        with pytest.raises(libvirt.libvirtError):
            net.bridgeName()
        facts = run("networks", Context(libvirt=test_driver))
    finally:
        net.undefine()
    assert facts["networks"] == [{"name": "default", "active": True, "bridge": "virbr0"},
                                 {"name": "vf-hostdev", "active": False, "bridge": ""}]


def test_libvirt_down_fails_only_what_needs_it(tmp_path: Path) -> None:
    local = LocalLibvirt(f"qemu+unix:///system?socket={tmp_path}/no.sock", on_change=lambda: None)
    facts = collectors.run_all(Context(libvirt=local, storage_paths=[tmp_path]))
    assert not facts["networks"]["ok"] and "libvirtd does not answer" in facts["networks"]["error"]
    assert facts["storage"]["ok"] and facts["storage"]["data"]["pools"] == []
    assert "libvirtd does not answer" in facts["storage"]["data"]["pools_error"]
    assert facts["storage"]["data"]["paths"][0]["size"] > 0
    assert facts["cpu"]["ok"] and facts["cpu"]["data"]["models_error"]
    assert all(facts[n]["ok"] for n in ("host", "kvm", "memory", "numa", "pci"))


# --- [facts] in agent.toml -------------------------------------------------------------

def test_facts_storage_paths_in_agent_toml(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("")
    assert config.load(path).facts.storage_paths == []
    path.write_text('[facts]\nstorage_paths = ["/isard", "/var/lib/libvirt/images"]\n')
    assert config.load(path).facts.storage_paths == [Path("/isard"), Path("/var/lib/libvirt/images")]


def test_report_carries_the_configured_storage_paths(tmp_path: Path,
                                                    test_driver: LocalLibvirt) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f'[facts]\nstorage_paths = ["{tmp_path}"]\n')
    facts = report._collect(config.load(path), test_driver).facts
    assert [p["path"] for p in facts["storage"]["data"]["paths"]] == [str(tmp_path)]


@pytest.mark.parametrize("value", ['"/isard"', '["/isard", ""]', "[1]", '[["/isard"]]'])
def test_facts_storage_paths_refused_unless_a_list_of_paths(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"[facts]\nstorage_paths = {value}\n")
    with pytest.raises(config.ConfigError, match="facts.storage_paths must be a list of paths"):
        config.load(path)


def test_facts_table_refuses_unknown_settings(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[facts]\nstorage_path = ["/isard"]\n')
    with pytest.raises(config.ConfigError, match="unknown setting facts.'storage_path'"):
        config.load(path)
    path.write_text('facts = "x"\n')
    with pytest.raises(config.ConfigError, match=r"\[facts\] must be a table"):
        config.load(path)
