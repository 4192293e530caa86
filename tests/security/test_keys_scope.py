"""Keys beyond the caller: no key allows a model the caller may not use, and no
`keys.admin` holder mints keys acting as a user who holds more than it does."""

from __future__ import annotations

import grpc
from tokenyard.auth.v1 import api_key_service_pb2 as keys_pb
from tokenyard.auth.v1 import audit_service_pb2 as audit_pb
from tokenyard.auth.v1 import auth_service_pb2 as auth_pb
from tokenyard.auth.v1 import resources_pb2 as res
from tokenyard.auth.v1 import role_service_pb2 as roles_pb

from tests.integration.auth.conftest import Auth
from tests.integration.auth.helpers import expect, field_of, make_user, md

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def models_of(svc: Auth, secret: str) -> list[str]:
    reply = await svc.auth.Authenticate(auth_pb.AuthenticateRequest(credential=secret))
    return list(reply.principal.allowed_models)


async def test_key_admin_cannot_mint_a_key_for_models_it_does_not_share(svc: Auth) -> None:
    """Attack: a `keys.admin` holder limited to `qwen*` mints a key for a `smollm2*`
    user; stored with an empty model list, the key meant "all of the owner's models"."""
    _, admin_key = await make_user(svc, "keyadmin", ["keys.admin", "generate"], models=["qwen*"])
    owner, _ = await make_user(svc, "owner", ["generate"], models=["smollm2*"])
    exc = await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=owner, name="wide"), metadata=md(admin_key)
        ),
        DENIED,
        "share no model",
    )
    assert field_of(exc) == "allowed_models"


async def test_sibling_key_and_rotation_cannot_widen_to_the_owners_models(svc: Auth) -> None:
    """Attack: a key left with no model after its owner's role changed creates a
    sibling key, or rotates the owner's unrestricted key, and gets every model back."""
    user, first = await make_user(
        svc, "sib", ["generate", "keys.manage_own"], models=["qwen*", "smollm2*"]
    )
    narrow = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=user, name="narrow", allowed_models=["qwen*"]),
        metadata=svc.admin,
    )
    wide_id = (
        (await svc.keys.ListApiKeys(keys_pb.ListApiKeysRequest(user_id=user), metadata=svc.admin))
        .api_keys[-1]
        .key_id
    )
    await svc.roles.UpdateRole(
        roles_pb.UpdateRoleRequest(
            role=res.Role(name="r-sib", allowed_models=["smollm2*"]),
            update_mask={"paths": ["allowed_models"]},
        ),
        metadata=svc.admin,
    )
    assert await models_of(svc, narrow.secret) == []
    assert await models_of(svc, first) == ["smollm2*"]
    exc = await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="sibling"), metadata=md(narrow.secret)
        ),
        DENIED,
    )
    assert field_of(exc) == "allowed_models"
    exc = await expect(
        svc.keys.RotateApiKey(
            keys_pb.RotateApiKeyRequest(key_id=wide_id), metadata=md(narrow.secret)
        ),
        DENIED,
    )
    assert field_of(exc) == "allowed_models"


async def test_key_admin_cannot_mint_keys_acting_as_a_stronger_user(svc: Auth) -> None:
    """Attack: a `keys.admin` holder mints a key for a `users.admin` holder and acts as
    them (the key is narrowed to the caller's permissions, but is theirs: audit rows,
    quota and ownership name the victim)."""
    _, admin_key = await make_user(svc, "keyadmin", ["keys.admin", "generate"])
    victim, victim_key = await make_user(svc, "boss", ["users.admin", "generate"])
    exc = await expect(
        svc.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(user_id=victim, name="mine"), metadata=md(admin_key)
        ),
        DENIED,
        "holds more",
    )
    assert field_of(exc) == "user_id"
    listed = await svc.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(user_id=victim), metadata=svc.admin
    )
    await expect(
        svc.keys.RotateApiKey(
            keys_pb.RotateApiKeyRequest(key_id=listed.api_keys[0].key_id), metadata=md(admin_key)
        ),
        DENIED,
        "holds more",
    )
    assert victim_key


async def test_audit_names_the_key_admin_who_minted_a_key_for_another_user(svc: Auth) -> None:
    """Attack: minting a key for someone else hides behind their name in the audit log."""
    admin_id, admin_key = await make_user(svc, "keyadmin", ["keys.admin", "generate"])
    owner, _ = await make_user(svc, "member", ["generate"])
    made = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=owner, name="for-member"), metadata=md(admin_key)
    )
    events = await svc.audit.ListAuditEvents(
        audit_pb.ListAuditEventsRequest(action="key.create", object_id=made.api_key.key_id),
        metadata=svc.admin,
    )
    [event] = events.events
    assert event.actor_user_id == admin_id and event.details["owner"] == owner


async def test_key_admin_cannot_revoke_the_keys_of_a_stronger_user(svc: Auth) -> None:
    """Attack: a `keys.admin` holder cuts off a `users.admin` holder (or the admin on
    call) by revoking or deleting their keys."""
    _, admin_key = await make_user(svc, "keyadmin", ["keys.admin", "generate"])
    victim, victim_key = await make_user(svc, "boss", ["users.admin", "generate"])
    listed = await svc.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(user_id=victim), metadata=svc.admin
    )
    key_id = listed.api_keys[0].key_id
    await expect(
        svc.keys.RevokeApiKey(keys_pb.RevokeApiKeyRequest(key_id=key_id), metadata=md(admin_key)),
        DENIED,
        "holds more",
    )
    await expect(
        svc.keys.DeleteApiKey(keys_pb.DeleteApiKeyRequest(key_id=key_id), metadata=md(admin_key)),
        DENIED,
        "holds more",
    )
    assert await models_of(svc, victim_key) == ["*"]


async def test_audit_rows_of_a_minted_key_name_who_minted_it(svc: Auth) -> None:
    """Attack: a `keys.admin` holder mints a key for a colleague and acts with it; every
    audit row then named only the colleague, hiding who really acted."""
    admin_id, admin_key = await make_user(
        svc, "keyadmin", ["keys.admin", "keys.manage_own", "generate"]
    )
    owner, _ = await make_user(svc, "member", ["generate", "keys.manage_own"])
    minted = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(user_id=owner, name="minted"), metadata=md(admin_key)
    )
    sibling = await svc.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="sibling"), metadata=md(minted.secret)
    )
    await svc.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(key_id=sibling.api_key.key_id), metadata=md(sibling.secret)
    )
    for action, object_id in (
        ("key.create", sibling.api_key.key_id),
        ("key.revoke", sibling.api_key.key_id),
    ):
        events = await svc.audit.ListAuditEvents(
            audit_pb.ListAuditEventsRequest(action=action, object_id=object_id),
            metadata=svc.admin,
        )
        [event] = events.events
        assert event.actor_user_id == owner
        assert event.details["key_minted_by"] == admin_id
