"""A replica's configuration: frozen, validated, one `ReplicaConfig` per process.

`kvfleet replica`'s flags map onto it in one place (kvfleet/cmd_replica.py: `replica_config`
from the parsed flags, `engine_flags` back to flags), and `replica.app.run_replica(cfg)` is the
one function that builds and serves a replica from it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.roles import BOTH, ROLES, check_role
from replica.kv_offload import TierSpec, tier_specs
from replica.lora import LoraModule

if TYPE_CHECKING:  # kept out of the import of this module: the CLI's menu imports it
    from replica.publisher import PublisherConfig
    from replica.step_model import SimPreset


@dataclass(frozen=True)
class EngineConfig:
    model: str = "tiny"  # a preset name from replica.model_config.PRESETS
    served_model_name: str | None = None  # the name clients use; defaults to `model`
    weights: str | None = None  # local safetensors file (Llama tensor naming); None = seeded init
    model_config_path: str | None = None  # HF config.json to go with `weights`
    tokenizer: str | None = None  # None/"byte" = built-in byte tokenizer, else a tokenizer.json path
    seed: int = 0  # weight init and default sampling seed
    block_size: int = 16
    num_blocks: int | None = None  # KV blocks; None = from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 64 * 1024 * 1024
    enable_prefix_caching: bool = True
    cache_salt: str | None = None  # separates caches (and hashes) of otherwise equal models
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads; None = torch's default
    # LoRA adapters served under their own names (`--lora-modules name=path`, replica/lora.py),
    # at most `max_loras` resident at once (vLLM's default is 1 too); on `--engine sim` a load
    # takes `lora_load_s` of modelled time (the torch engine measures its own).
    lora_modules: tuple[LoraModule, ...] = ()
    max_loras: int = 1
    lora_load_s: float = 0.04
    # KV offload tiers (replica/kv_offload.py): blocks the device pool evicts spill into a host-
    # memory tier of `host_kv_blocks` blocks, and what that evicts into a disk tier of
    # `disk_kv_blocks` blocks kept in the file `disk_kv_path` (torch engine; a sim engine models
    # the tier without a file). 0 = no such tier. A prefix found in a tier is loaded back.
    host_kv_blocks: int = 0
    disk_kv_blocks: int = 0
    disk_kv_path: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError("num_blocks must be at least 2")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be at least 1")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if not self.lora_load_s >= 0:
            raise ValueError(f"lora_load_s must be >= 0 seconds, got {self.lora_load_s}")
        tier_specs(self.host_kv_blocks, self.disk_kv_blocks)  # raises on a bad combination
        names = [m.name for m in self.lora_modules]
        if len(set(names)) != len(names) or self.model_name in names:
            raise ValueError("each LoRA adapter needs its own name, other than the base model's")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def kv_tiers(self) -> tuple[TierSpec, ...]:
        """The offload tiers below the device pool, host first (empty: none)."""
        return tier_specs(self.host_kv_blocks, self.disk_kv_blocks)


@dataclass(frozen=True)
class ServerConfig:
    """The replica's HTTP server. What it says about the model (name, context length,
    vocabulary) comes from the engine it serves."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free one (the ready line prints it)
    max_body_bytes: int = 16 * 1024 * 1024
    drain_timeout_s: float = 30.0  # SIGTERM waits this long for in-flight requests
    api_keys: tuple[str, ...] = ()  # non-empty: clients must send one as a Bearer token (replica/auth.py)

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be non-negative, got {self.drain_timeout_s}")


@dataclass(frozen=True)
class KVTransferConfig:
    """Prefill/decode disaggregation (replica/kv_transfer.py). Every role serves whole requests
    too (a balancer falls back to one replica when a pair member fails); the role says what the
    balancer should use the replica for. A prefill (or both) replica binds a ZMQ ROUTER on
    host:port from which decode replicas pull a finished prefill's blocks."""

    role: str = BOTH  # prefill | decode | both (vLLM's kv_producer / kv_consumer / kv_both)
    host: str = "127.0.0.1"  # prefill/both: the address the block socket binds and decode replicas dial
    port: int = 0  # prefill/both: 0 = a free port (the ready line and each prefill's kv_transfer_params say which)
    # A pull gives up when the next block takes longer than this (a dead or stuck prefill
    # replica); the decode replica then computes the rest of the prompt itself.
    timeout_s: float = 5.0
    # How long a prefill replica holds a finished prefill's blocks for its decode replica (vLLM
    # waits VLLM_NIXL_ABORT_REQUEST_TIMEOUT = 480 s; held blocks are capacity that no other
    # request can use, and a pull comes within milliseconds or never).
    keep_s: float = 30.0
    # The prefill replicas a decode request may name as `remote_host` (kv_transfer_params come
    # from the client's side of the balancer, so a replica never dials a host given by whoever
    # sends a request): IP addresses, CIDR networks (`10.0.0.0/8`) or host names (matched as
    # written, never resolved), besides loopback and this replica's own `host`, always allowed.
    # `*` allows any host. `kvfleet fleet` passes its replicas' host.
    peers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_role(self.role, "--role")
        object.__setattr__(self, "peers", tuple(self.peers))
        for peer in self.peers:
            if not isinstance(peer, str) or not peer.strip() or any(c in peer for c in " ,"):
                raise ValueError(f"--kv-transfer-peers takes IP addresses, CIDR networks or host names, got {peer!r}")
            if "/" in peer:
                try:
                    ipaddress.ip_network(peer, strict=False)
                except ValueError:
                    raise ValueError(f"--kv-transfer-peers: {peer!r} is not a CIDR network such as 10.0.0.0/8") from None
        if not 0 <= self.port < 65536:
            raise ValueError(f"kv transfer port must be in [0, 65535], got {self.port}")
        if not self.timeout_s > 0 or not self.keep_s > 0:
            raise ValueError("kv transfer timeout and keep times must be positive seconds")


    def allows_peer(self, host: str) -> bool:
        """Whether a decode request may pull KV from `host` (a kv_transfer_params `remote_host`)."""
        if "*" in self.peers:
            return True
        name = host.strip("[]").lower()
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:  # a host name: allowed only as written (no DNS lookup, which a client could steer)
            return name == "localhost" or name in (p.lower() for p in (self.host, *self.peers))
        if addr.is_loopback:
            return True
        for peer in (self.host, *self.peers):
            try:
                if addr in ipaddress.ip_network(peer.strip("[]"), strict=False):
                    return True
            except ValueError:
                continue  # a host name entry
        return False


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything one replica process runs with."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    publisher: PublisherConfig | None = None  # None: no KV-event sockets
    # None: the torch engine. Else a sim engine (real scheduler and block pool, no torch) whose
    # step times and KV capacity model this set-up, `time_scale` times faster than it.
    sim_preset: SimPreset | None = None
    time_scale: float = 1.0
    step_log: int = 0  # keep the last N steps for GET /step_log (`kvfleet calibrate`); 0 = off
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)

    def __post_init__(self) -> None:
        if self.step_log < 0:
            raise ValueError(f"step_log must be 0 (off) or a number of steps, got {self.step_log}")
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {self.time_scale}")
        if self.kv_transfer.role != BOTH and self.sim_preset is not None:
            raise ValueError("--role prefill|decode needs the torch engine: a sim replica has no KV tensors to hand over")

    @property
    def kind(self) -> str:
        return "sim" if self.sim_preset is not None else "torch"
