"""``PUT/GET /v1/services/{name}/policy``: the service's health check and rollout knobs."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel

from deployster.notify import keep_secrets
from deployster.policy import ServicePolicy
from deployster.web.context import services
from deployster.web.inputs import read_json, service_name

routes = web.RouteTableDef()


class PolicyEnvelope(BaseModel):
    policy: ServicePolicy


@routes.put("/v1/services/{name}/policy")
async def put_policy(request: web.Request) -> web.Response:
    service = service_name(request)
    policy = (await read_json(request, PolicyEnvelope)).policy
    store = services(request).store
    if "notify" in policy.model_fields_set:
        # A secret sent back masked, as GET shows it, stays what it was.
        stored = await store.get_policy(service)
        policy = policy.model_copy(update={"notify": keep_secrets(policy.notify, stored.notify)})
    await store.save_policy(service, policy)
    return web.json_response({"policy": (await store.get_policy(service)).model_dump(mode="json")})


@routes.get("/v1/services/{name}/policy")
async def get_policy(request: web.Request) -> web.Response:
    policy = await services(request).store.get_policy(service_name(request))
    return web.json_response({"policy": policy.model_dump(mode="json")})
