"""Units: tokens (server/tokens.py) and configuration (server/config.py)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from server.config import ConfigError, IceServer, load_config
from server.errors import Unauthorized
from server.roles import Role
from server.tokens import ISSUER, Grant, TokenAuthority

from .conftest import make_config, start_server

ROOT = Path(__file__).resolve().parent.parent
OLD_SECRET = "o" * 40
NEW_SECRET = "n" * 48
OLD_KEY = f"2026-05:{OLD_SECRET}"
NEW_KEY = f"2026-11:{NEW_SECRET}"


def refused(authority: TokenAuthority, token: str, code: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        authority.verify(token)
    error = info.value
    assert error.code == code, error.to_dict()
    assert error.to_dict()["status"] == 401 and error.to_dict()["fault"] == "user"
    return error


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "sid": "or1-live", "role": "trainee", "sub": "p-1",
                            "name": "T", "iat": now, "exp": now + 600, "jti": "j-1"}
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def signed(payload: dict[str, Any], secret: str = OLD_SECRET, kid: str = "2026-05") -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers={"kid": kid})


# -- tokens -----------------------------------------------------------------------

def test_round_trip_carries_the_grant():
    authority = TokenAuthority([OLD_KEY])
    before = time.time()
    token = authority.issue("or1-live", Role.TRAINEE, name="Ana Ruiz", ttl_s=120,
                            participant_id="tr-7")
    grant = authority.verify(token)
    assert isinstance(grant, Grant)
    assert (grant.session_id, grant.role, grant.participant_id, grant.name) == (
        "or1-live", Role.TRAINEE, "tr-7", "Ana Ruiz")
    assert before + 118 <= grant.expires_at <= time.time() + 121
    assert grant.token_id

    header = jwt.get_unverified_header(token)
    assert header["kid"] == "2026-05" and header["alg"] == "HS256"
    payload = jwt.decode(token, OLD_SECRET, algorithms=["HS256"], issuer=ISSUER)
    assert set(payload) >= {"iss", "sid", "role", "sub", "name", "iat", "exp", "jti"}

    # Every token is its own: fresh jti, fresh participant id when none is given.
    a, b = (authority.verify(authority.issue("or1-live", Role.EXPERT)) for _ in range(2))
    assert a.token_id != b.token_id and a.participant_id != b.participant_id
    # Display names are bounded.
    long_name = authority.verify(authority.issue("or1-live", Role.TRAINEE, name="x" * 500))
    assert len(long_name.name) <= 64


def test_key_rotation_first_signs_all_verify():
    old = TokenAuthority([OLD_KEY])
    rotated = TokenAuthority([NEW_KEY, OLD_KEY])
    from_old = old.issue("or1-live", Role.EXPERT, participant_id="e-1")
    assert rotated.verify(from_old).participant_id == "e-1"

    from_new = rotated.issue("or1-live", Role.EXPERT)
    assert jwt.get_unverified_header(from_new)["kid"] == "2026-11"
    assert rotated.verify(from_new).role == Role.EXPERT
    # A Node still on the old key alone does not know the new kid.
    refused(old, from_new, "token_invalid")
    # Once the old key is retired, its tokens stop working.
    refused(TokenAuthority([NEW_KEY]), from_old, "token_invalid")


def test_unknown_kid_and_foreign_secrets_are_rejected():
    authority = TokenAuthority([OLD_KEY])
    refused(authority, signed(claims(), kid="2020-01"), "token_invalid")
    refused(authority, signed(claims(), secret="z" * 40), "token_invalid")
    no_kid = jwt.encode(claims(), OLD_SECRET, algorithm="HS256")
    refused(authority, no_kid, "token_invalid")
    # Two ephemeral (no configured key) authorities share a kid, not a secret.
    refused(TokenAuthority([]), TokenAuthority([]).issue("or1-live", Role.EXPERT),
            "token_invalid")


def test_tampered_payload_is_rejected():
    authority = TokenAuthority([OLD_KEY])
    token = authority.issue("or1-live", Role.TRAINEE)
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    for field, value in (("role", "expert"), ("sid", "or2-live"), ("exp", decoded["exp"] + 9999)):
        forged = dict(decoded, **{field: value})
        body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        refused(authority, f"{header}.{body}.{signature}", "token_invalid")
    # A flipped signature character.
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    refused(authority, f"{header}.{payload}.{flipped}", "token_invalid")
    # alg=none with the right kid.
    unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": "2026-05"})
    refused(authority, unsigned, "token_invalid")


@pytest.mark.parametrize("missing", ["exp", "sid", "role", "sub", "jti", "iss"])
def test_missing_claims_are_rejected(missing):
    refused(TokenAuthority([OLD_KEY]), signed(claims(**{missing: None})), "token_invalid")


def test_bad_claims_are_rejected():
    authority = TokenAuthority([OLD_KEY])
    assert authority.verify(signed(claims())).role == Role.TRAINEE  # the baseline is valid
    refused(authority, signed(claims(iss="someone-else")), "token_invalid")
    refused(authority, signed(claims(role="surgeon-in-chief")), "token_invalid")
    refused(authority, signed(claims(exp=int(time.time()) - 5)), "token_expired")
    refused(authority, authority.issue("or1-live", Role.EXPERT, now=time.time() - 7200,
                                       ttl_s=60), "token_expired")
    refused(authority, "", "token_missing")
    refused(authority, "definitely-not-a-jwt", "token_invalid")
    refused(authority, "a.b.c", "token_invalid")


async def test_server_verifies_with_configured_rotating_keys(http):
    srv, runner = await start_server(make_config(auth={"signing_keys": [NEW_KEY, OLD_KEY]}))
    try:
        url = f"{srv.base_url}/api/sessions/or1-live"
        for token in (TokenAuthority([OLD_KEY]).issue("or1-live", Role.TRAINEE, name="Old"),
                      TokenAuthority([NEW_KEY]).issue("or1-live", Role.TRAINEE, name="New")):
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status == 200, await response.text()
        stranger = TokenAuthority(["2026-11:" + "s" * 40]).issue("or1-live", Role.TRAINEE)
        async with http.get(url, headers={"Authorization": f"Bearer {stranger}"}) as response:
            assert response.status == 401
            assert (await response.json())["code"] == "token_invalid"
        # The server signs with the first key.
        assert jwt.get_unverified_header(srv.token(Role.EXPERT))["kid"] == "2026-11"
    finally:
        await runner.cleanup()


# -- configuration ----------------------------------------------------------------

FULL_TOML = f"""
[server]
host = "0.0.0.0"
port = 8443
public_url = "https://scrubin.example/"
cors_origins = ["https://a.example", "https://b.example"]

[ice]
servers = [{{ urls = "turn:turn.example:3478", username = "u", credential = "c" }},
           {{ urls = ["stun:stun.example:3478"] }}]
host_addresses = ["10.0.0.5"]
allowed_remote_networks = ["10.0.0.0/8", "fd00::/8"]

[auth]
signing_keys = ["{OLD_KEY}"]
token_ttl_s = 600

[media]
feed_grace_s = 12.5
min_bitrate_kbps = 800

[limits]
max_feeds_per_session = 3

[[theatres]]
id = "or-3"
name = "Theatre 3"
slots = ["room", "endoscope"]

[[sessions]]
id = "morning"
theatre = "or-3"
title = "Morning list"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scrubin.toml"
    path.write_text(text)
    return path


def test_toml_file_is_parsed_into_typed_sections(tmp_path):
    config = load_config(write(tmp_path, FULL_TOML), env={})
    assert config.server.host == "0.0.0.0" and config.server.port == 8443
    assert config.server.cors_origins == ["https://a.example", "https://b.example"]
    assert config.base_url == "https://scrubin.example"
    assert config.ice.servers == [
        IceServer(urls=["turn:turn.example:3478"], username="u", credential="c"),
        IceServer(urls=["stun:stun.example:3478"]),
    ]
    assert config.ice.host_addresses == ["10.0.0.5"]
    assert config.ice.allowed_remote_networks == ["10.0.0.0/8", "fd00::/8"]
    assert config.auth.signing_keys == [OLD_KEY] and config.auth.token_ttl_s == 600
    assert config.media.feed_grace_s == 12.5 and config.media.min_bitrate_kbps == 800
    assert config.media.max_bitrate_kbps == 4000  # untouched defaults stay
    assert config.limits.max_feeds_per_session == 3
    assert [(t.id, t.name, t.slots) for t in config.theatres] == [
        ("or-3", "Theatre 3", ["room", "endoscope"])]
    assert [(s.id, s.theatre, s.title) for s in config.sessions] == [
        ("morning", "or-3", "Morning list")]


def test_defaults_without_a_file():
    config = load_config(None, env={})
    assert config.server.port == 8080 and config.server.host == "127.0.0.1"
    assert config.base_url == "http://127.0.0.1:8080"
    # Never a public STUN server by default.
    assert config.ice.servers == [] and config.server.cors_origins == []
    assert config.auth.signing_keys == []


def test_environment_overrides_file(tmp_path):
    env = {
        "SCRUBIN_SERVER_PORT": "9443",
        "SCRUBIN_ICE_HOST_ADDRESSES": "127.0.0.1,127.0.0.2",
        "SCRUBIN_AUTH_SIGNING_KEYS": f"{NEW_KEY}, {OLD_KEY}",
        "SCRUBIN_ICE_SERVERS": "turn:a.example:3478,stun:b.example",
        "SCRUBIN_MEDIA_FEED_GRACE_S": "2.5",
        "SCRUBIN_SERVER_CORS_ORIGINS": "",
        "UNRELATED": "ignored",
    }
    config = load_config(write(tmp_path, FULL_TOML), env=env)
    assert config.server.port == 9443
    assert config.ice.host_addresses == ["127.0.0.1", "127.0.0.2"]
    assert config.auth.signing_keys == [NEW_KEY, OLD_KEY]
    assert config.ice.servers == [IceServer(urls=["turn:a.example:3478"]),
                                  IceServer(urls=["stun:b.example"])]
    assert config.media.feed_grace_s == 2.5
    assert config.server.cors_origins == []
    assert config.server.host == "0.0.0.0"  # not overridden


def test_process_environment_is_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRUBIN_SERVER_PORT", "7001")
    monkeypatch.setenv("SCRUBIN_LIMITS_MAX_SUBSCRIPTIONS_PER_PARTICIPANT", "2")
    config = load_config(write(tmp_path, FULL_TOML))
    assert config.server.port == 7001
    assert config.limits.max_subscriptions_per_participant == 2


BAD_CONFIGS = {
    "unknown-key": ("[server]\nprot = 80\n", {}),
    "unknown-section": ("[servr]\nport = 80\n", {}),
    "unknown-media-key": ("[media]\nkeyframe_every = 3\n", {}),
    "bad-network": ('[ice]\nallowed_remote_networks = ["10.0.0.0/33"]\n', {}),
    "not-a-network": ('[ice]\nallowed_remote_networks = ["hospital-lan"]\n', {}),
    "bad-network-env": ("", {"SCRUBIN_ICE_ALLOWED_REMOTE_NETWORKS": "127.0.0.0/8,nope"}),
    "host-address-name": ('[ice]\nhost_addresses = ["localhost"]\n', {}),
    "short-key": ('[auth]\nsigning_keys = ["k1:short"]\n', {}),
    "short-key-env": ("", {"SCRUBIN_AUTH_SIGNING_KEYS": "k1:" + "s" * 31}),
    "key-without-kid": (f'[auth]\nsigning_keys = [":{"s" * 40}"]\n', {}),
    "key-without-colon": (f'[auth]\nsigning_keys = ["{"s" * 40}"]\n', {}),
    "port-not-int": ('[server]\nport = "eighty"\n', {}),
    "port-bool": ("[server]\nport = true\n", {}),
    "port-env-not-int": ("", {"SCRUBIN_SERVER_PORT": "http"}),
    "host-not-str": ("[server]\nhost = 127\n", {}),
    "list-of-ints": ("[server]\ncors_origins = [1, 2]\n", {}),
    "tls-half": ('[server]\ntls_cert = "/etc/cert.pem"\n', {}),
    "duplicate-theatre": ('[[theatres]]\nid = "a"\nslots = ["room"]\n'
                          '[[theatres]]\nid = "a"\nslots = ["room"]\n', {}),
    "theatre-without-slots": ('[[theatres]]\nid = "a"\n', {}),
    "session-unknown-theatre": ('[[sessions]]\nid = "s"\ntheatre = "nowhere"\n', {}),
    "session-without-theatre": ('[[sessions]]\nid = "s"\n', {}),
    "ice-server-without-urls": ('[ice]\nservers = [{ username = "u" }]\n', {}),
    "not-toml": ("[server\nport = 1\n", {}),
    "media-urls-longer-than-5-min": ("[recording]\nmedia_url_ttl_s = 3600\n", {}),
    "trusted-proxy-not-a-network": ('[server]\ntrusted_proxies = ["proxy.local"]\n', {}),
    "node-url-not-a-url": ('[server]\nnode_urls = ["node-b:8443"]\n', {}),
    "public-url-not-a-url": ('[server]\npublic_url = "javascript:alert(1)"\n', {}),
    "role-cap-unknown-role": ("[auth]\nrole_max_ttl_s = { surgeon = 600 }\n", {}),
    "role-cap-too-long": ("[auth]\nrole_max_ttl_s = { trainee = 9e9 }\n", {}),
    "role-cap-env-malformed": ("", {"SCRUBIN_AUTH_ROLE_MAX_TTL_S": "trainee=600"}),
    "recheck-too-slow": ("[auth]\nrecheck_interval_s = 10\n", {}),
    "no-devices-per-invite": ("[limits]\ndevices_per_invite = 0\n", {}),
    "no-header-timeout": ("[limits]\nheader_timeout_s = 0\n", {}),
    # Pages take 7 s of silence for a vanished Node.
    "keepalive-too-slow": ("[liveness]\nws_keepalive_s = 6\n", {}),
}


def test_role_caps_from_the_file_and_the_environment(tmp_path):
    config = load_config(write(tmp_path, "[auth]\ntoken_ttl_s = 7200\n"
                                         "role_max_ttl_s = { reviewer = 900 }\n"), env={})
    caps = config.role_caps()
    assert caps[Role.REVIEWER] == 900 and caps[Role.TRAINEE] == 7200
    env = {"SCRUBIN_AUTH_ROLE_MAX_TTL_S": "trainee:600, expert:3600"}
    caps = load_config(None, env=env).role_caps()
    assert (caps[Role.TRAINEE], caps[Role.EXPERT], caps[Role.ADMIN]) == (600, 3600, 12 * 3600)


@pytest.mark.parametrize(("text", "env"), list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_configuration_is_a_config_error(tmp_path, text, env):
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, text), env=env)


def test_missing_file_and_unknown_override_section_are_config_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_config(tmp_path / "absent.toml", env={})
    with pytest.raises(ConfigError):
        load_config(None, env={}, turn={"port": 1})
    with pytest.raises(ConfigError):
        load_config(None, env={}, limits={"max_everything": 1})
    assert issubclass(ConfigError, ValueError)


def test_shipped_demo_config_loads():
    config = load_config(ROOT / "configs" / "demo.toml", env={})
    assert config.server.host == "127.0.0.1"
    assert config.ice.servers == [] and config.ice.host_addresses == ["127.0.0.1"]
    assert config.ice.allowed_remote_networks == ["127.0.0.0/8"]
    assert config.auth.signing_keys == []
    assert [t.id for t in config.theatres] == ["demo-or"]
    assert "room" in config.theatres[0].slots
    assert [(s.id, s.theatre) for s in config.sessions] == [("demo", "demo-or")]


def test_shipped_production_example_loads_and_takes_keys_from_env():
    path = ROOT / "configs" / "production.example.toml"
    turn_secret = {"SCRUBIN_TURN_SECRET": "t" * 32}
    config = load_config(path, env=turn_secret)
    assert config.server.port == 8443 and config.server.tls_cert and config.server.tls_key
    assert config.base_url == "https://scrubin.hospital.example"
    # TURN for clients, with the secret from the environment; none for the Node itself.
    assert config.turn.urls[-1] == "turns:turn.hospital.example:443?transport=tcp"
    assert config.turn.secret == "t" * 32
    assert config.ice.servers == [] and config.ice.node_servers == []
    with pytest.raises(ConfigError, match="SCRUBIN_TURN_SECRET"):
        load_config(path, env={})
    assert config.auth.token_ttl_s == 43200
    assert [t.id for t in config.theatres] == ["or-3"]

    with_keys = load_config(path, env={**turn_secret,
                                       "SCRUBIN_AUTH_SIGNING_KEYS": f"{NEW_KEY},{OLD_KEY}"})
    authority = TokenAuthority(with_keys.auth.signing_keys)
    token = TokenAuthority([OLD_KEY]).issue("s", Role.ADMIN)
    assert authority.verify(token).role == Role.ADMIN


def test_node_ids_stay_the_same_across_restarts_and_workers_get_their_own_ports():
    from server.nodes import default_node_id
    from server.workers import worker_config, worker_count

    path = ROOT / "configs" / "production.example.toml"
    # The example's TURN section takes its secret from the environment.
    turn = {"SCRUBIN_TURN_SECRET": "s" * 32}
    env = {"SCRUBIN_STORE_REDIS_URL": "redis://127.0.0.1:1/0", **turn}
    config = load_config(path, env=env)
    assert default_node_id(config) == default_node_id(load_config(path, env=env))
    assert default_node_id(config).endswith("-8443")
    named = load_config(path, env={**env, "SCRUBIN_SERVER_NODE_ID": "theatres-a"})
    assert default_node_id(named) == "theatres-a"

    assert worker_count(config, None) >= 1 and worker_count(config, 3) == 3
    workers = [worker_config(named, i, 3) for i in range(3)]
    assert [w.server.node_id for w in workers] == [f"theatres-a-w{i}" for i in range(3)]
    assert [w.server.port for w in workers] == [8444, 8445, 8446]
    assert [w.base_url for w in workers] == [
        f"https://scrubin.hospital.example:{p}" for p in (8444, 8445, 8446)]
    # 40000-40999 in three parts; the remainder is left unused.
    assert [w.ice.udp_ports for w in workers] == ["40000-40332", "40333-40665", "40666-40998"]
    assert all(w.store.redis_url == named.store.redis_url for w in workers)

    alone = load_config(path, env=turn)
    assert worker_count(alone, None) == 1 and worker_count(alone, 1) == 1
    with pytest.raises(ConfigError, match="redis_url"):
        worker_count(alone, 2)
    with pytest.raises(ConfigError, match="udp_ports"):
        load_config(path, env={"SCRUBIN_ICE_UDP_PORTS": "40000-39999", **turn})
    with pytest.raises(ConfigError, match="cluster"):
        load_config(path, env={"SCRUBIN_CLUSTER_NODE_TTL_S": "0.5", **turn})
