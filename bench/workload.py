"""What the benchmark feeds the servers: generated names, the blocklists directory for sinkhole,
the same list as dnsmasq and Unbound configuration, and dnsperf input files. Deterministic for a
given seed, so every server in a run (and every run with the same seed) sees the same names."""
from __future__ import annotations

import random
from pathlib import Path

import yaml

UPSTREAM_ZONE = "bench.test"          # the upstream answers every name below it with 192.0.2.1
BLOCK_SERVICE = "bench-blocked"
DESKTOP_NET, MOBILE_NET = "127.0.1.0/24", "127.0.2.0/24"
DESKTOP_CLIENT, MOBILE_CLIENT = "127.0.1.10", "127.0.2.10"
ENTRIES_PER_FILE = 250_000            # keeps each service file well under the loader's size limit


def blocked_names(count: int, seed: int = 7) -> list[str]:
    """`count` distinct names of 2-4 labels under a few hundred parent zones, like a real list."""
    rng = random.Random(seed)
    parents = [f"z{rng.randrange(36 ** 4):04x}.{rng.choice(('com', 'net', 'org', 'io', 'cn'))}"
               for _ in range(500)]
    out = []
    for i in range(count):
        parent = parents[i % len(parents)]
        head = f"b{i:x}-{rng.randrange(1 << 24):06x}"
        out.append(f"{head}.{parent}" if i % 3 else f"cdn.{head}.{parent}")
    return out


def allowed_names(count: int = 2000) -> list[str]:
    return [f"a{i}.{UPSTREAM_ZONE}" for i in range(count)]


def miss_names(count: int, nonce: str) -> list[str]:
    """Names no cache has seen: unique per run through `nonce`."""
    return [f"m{nonce}-{i}.{UPSTREAM_ZONE}" for i in range(count)]


def mix(blocked: list[str], allowed: list[str], share_blocked: float, total: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    n_blocked = round(total * share_blocked)
    out = [rng.choice(blocked) for _ in range(n_blocked)] + [rng.choice(allowed) for _ in range(total - n_blocked)]
    rng.shuffle(out)
    return out


def shuffled(names: list[str], seed: int = 13) -> list[str]:
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


def write_queries(path: Path, names: list[str], qtype: str = "A") -> Path:
    with open(path, "w") as f:
        f.writelines(f"{n} {qtype}\n" for n in names)
    return path


def write_blocklists(directory: Path, names: list[str]) -> Path:
    """A sinkhole blocklists directory: desktop (127.0.1.0/24) blocks the generated services with
    NXDOMAIN, mobile (127.0.2.0/24) blocks nothing; anyone on 127.0.0.0/8 may ask."""
    services_dir = directory / "services"
    services_dir.mkdir(parents=True, exist_ok=True)
    for old in [*services_dir.glob("*.yaml"), *services_dir.glob("*.txt")]:
        old.unlink()
    services = []
    for part, start in enumerate(range(0, max(len(names), 1), ENTRIES_PER_FILE)):
        service = BLOCK_SERVICE if part == 0 else f"{BLOCK_SERVICE}-{part}"
        services.append(service)
        # big lists go in plain-text list files (domain_lists), as a department would import them
        with open(services_dir / f"{service}.txt", "w") as f:
            f.writelines(f"{n}\n" for n in names[start:start + ENTRIES_PER_FILE])
        with open(services_dir / f"{service}.yaml", "w") as f:
            f.write(f"description: {len(names)} generated names for the benchmark (part {part})\n"
                    "sources:\n  gen: bench/workload.py, generated\n"
                    f"domain_lists:\n  - {{file: {service}.txt, source: gen}}\n")
    policy = {
        "groups": {
            "desktop": {"subnets": [DESKTOP_NET], "block": services, "response": "nxdomain"},
            "mobile": {"subnets": [MOBILE_NET], "block": []},
        },
        "default_group": "mobile",
        "allowed_clients": ["127.0.0.0/8"],
    }
    (directory / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    return directory


def write_dnsmasq_list(path: Path, names: list[str]) -> Path:
    """`address=/name/` with no address: NXDOMAIN for the name and every name below it."""
    with open(path, "w") as f:
        f.writelines(f"address=/{n}/\n" for n in names)
    return path


def write_unbound_list(path: Path, names: list[str]) -> Path:
    """`always_nxdomain`: NXDOMAIN for the name and every name below it."""
    with open(path, "w") as f:
        f.writelines(f'local-zone: "{n}." always_nxdomain\n' for n in names)
    return path
