"""The helper's settings: flags > ``DFL_*`` environment > ``--config`` TOML > defaults."""

from __future__ import annotations

from pydantic import Field

from messages.daemon.settings import FederationSettings


class HelperConfig(FederationSettings):
    """Everything a ``Helper`` needs; see ``dfl helper --help`` for each option.

    ``seal_key`` is the helper's X25519 private key (``helper-seal.key``), ``party_keys`` the
    helper's own directory of the parties' Ed25519 public keys (``<id>.pub``, never taken
    from the leader), with ``aggregator.pub`` to check that requests come from the leader and
    ``helper.key`` to sign the answers. ``state_dir`` keeps what it answered, across restarts.
    """

    seal_key: str | None = None
    party_keys: str | None = None
    state_dir: str = "helper-state"
    min_buffer: int = Field(default=3, ge=2)
    max_weight: int = Field(default=16, ge=1, le=1 << 16)
    delivery_limit: int = Field(default=5, ge=1)

    def _missing_keys(self) -> tuple[list[str], str]:
        missing = [] if self.party_keys else ["--party-keys"]
        return missing, ("pass --party-keys DIR with every party's <id>.pub, aggregator.pub and "
                         "helper.key (made by `dfl admin add-helper` and `add-party`)")
