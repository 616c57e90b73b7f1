"""The labelling app as a Ray Serve deployment: the annotator page, the admin page and their JSON API.

Routes (under the application's route prefix, ``/label`` for ``alignray label``):

- ``GET /`` the annotator page, ``GET /admin`` the admin page, ``GET /static/<file>`` their
  script and style (no data: open to everyone), ``GET /healthz``;
- ``GET /api/me``, ``GET /api/next`` (the current item, assigning one if needed, generating a
  batch from the policy when none is left), ``POST /api/label``, ``POST /api/skip``,
  ``POST /api/undo``: an annotator's token;
- ``GET /api/admin/stats``, ``GET /api/admin/items`` (with reward-model scores when a reward
  deployment is bound), ``POST /api/admin/invite``: the admin key or an admin's token.

Every request names its person with ``Authorization: Bearer <token>``. A label is committed to
the store before ``POST /api/label`` answers. Composition: candidates come through a handle to
``serve.app.PolicyServer`` in the application ``policy_app``; ``reward`` is a handle to
``serve.rewards.RewardScorer``.
"""

# No `from __future__ import annotations` here: Serve's FastAPI ingress would read `request:
# Request` as a query parameter.
import asyncio
import hmac

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from ray import serve

from serve.http import make_app
from serve.labelling import api
from serve.labelling.candidates import GenerationSpec, PolicyCandidates
from serve.labelling.reports import recent_items, stats
from serve.labelling.settings import FeedbackSettings
from serve.labelling.store import Annotator, Assignment, LabelStore, StoreError
from serve.labelling.web import SECURITY_HEADERS, CrossSiteGuard, asset, page
from serve.protocol import APIError

app = make_app()
app.add_middleware(CrossSiteGuard)
POLICY_DEPLOYMENT = "PolicyServer"
ADMIN = Annotator(id=0, name="admin", role="admin")
"""Who the admin key is: may see the admin page, may not label (it is nobody's judgement)."""


def _item(job: Assignment | None) -> api.Item | None:
    return None if job is None else api.Item(slot=job.slot_id, prompt=job.prompt, left=job.left, right=job.right)


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class LabelApp:
    """One replica: a store connection, and optionally handles to the policy and reward deployments."""

    def __init__(
        self,
        settings: FeedbackSettings,
        db_url: str,
        admin_key: str,
        policy_app: str | None = None,
        spec: GenerationSpec | None = None,
        reward=None,
        round_: int = 0,
        max_items: int = 0,
    ):
        self.settings, self.admin_key = settings, admin_key
        self.store = LabelStore(db_url, settings.overlap, settings.claim_timeout_s, settings.sqlite_synchronous)
        self.source = None
        if policy_app is not None and spec is not None:
            handle = serve.get_deployment_handle(POLICY_DEPLOYMENT, app_name=policy_app)
            self.source = PolicyCandidates(handle, spec)
        self.reward, self.round, self.max_items = reward, round_, max_items
        self._generating = asyncio.Lock()
        app.state.max_request_bytes = settings.max_request_bytes
        app.state.allowed_origins = frozenset(settings.allowed_origins)

    # ---- who is asking ------------------------------------------------------------------------

    async def _who(self, request: Request, admin: bool = False) -> Annotator:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if self.admin_key and token and hmac.compare_digest(token.encode(), self.admin_key.encode()):
            return ADMIN
        person = await asyncio.to_thread(self.store.authenticate, token)
        if person is None:
            raise APIError(401, "Missing or unknown token: open your personal link again.", code="invalid_token")
        if admin and person.role != "admin":
            raise APIError(403, "This needs an admin token.", code="forbidden")
        return person

    async def _annotator(self, request: Request) -> Annotator:
        person = await self._who(request)
        if person is ADMIN:
            raise APIError(403, "The admin key cannot label: invite yourself as an annotator.", code="forbidden")
        return person

    async def _call(self, fn, *args, **kwargs):
        """A store call off the event loop; its refusals become HTTP errors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except StoreError as err:
            raise APIError(err.status, str(err), code="conflict" if err.status == 409 else None) from err

    async def _progress(self, person: Annotator) -> api.Progress:
        return api.Progress(**await self._call(self.store.progress, person.id))

    # ---- pages --------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def annotator_page(self, request: Request):
        return HTMLResponse(page("index.html", request.scope.get("root_path", "")), headers=SECURITY_HEADERS)

    @app.get("/admin", response_class=HTMLResponse, include_in_schema=False)
    async def admin_page(self, request: Request):
        return HTMLResponse(page("admin.html", request.scope.get("root_path", "")), headers=SECURITY_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str):
        try:
            text, media_type = asset(name)
        except KeyError:
            raise APIError(404, f"no static file {name!r}", code="not_found") from None
        return Response(text, media_type=media_type, headers=SECURITY_HEADERS)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True, "slots": await self._call(self.store.slot_counts)}

    # ---- annotators ---------------------------------------------------------------------------

    @app.get("/api/me", responses=api.errors(401))
    async def me(self, request: Request) -> api.Me:
        person = await self._who(request)
        return api.Me(name=person.name, role=person.role, criteria=self.settings.criteria)

    async def _generate(self) -> None:
        """Add a batch of items from the policy, unless the round is full."""
        have = await self._call(self.store.round_items, self.round)
        want = self.settings.batch_size if not self.max_items else min(self.settings.batch_size, self.max_items - have)
        if want > 0:
            rows, keys = await self.source.batch(want)
            await self._call(self.store.add_items, self.round, rows, keys)

    @app.get("/api/next", responses=api.errors(401, 403))
    async def next_item(self, request: Request) -> api.Next:
        person = await self._annotator(request)
        job = await self._call(self.store.claim, person.id)
        if job is None and self.source is not None:
            async with self._generating:  # one batch at a time per replica; others wait, then claim
                job = await self._call(self.store.claim, person.id)
                if job is None:
                    await self._generate()
                    job = await self._call(self.store.claim, person.id)
        return api.Next(item=_item(job), progress=await self._progress(person), criteria=self.settings.criteria)

    @app.post("/api/label", responses=api.errors(400, 401, 403, 404, 409, 413))
    async def label(self, request: Request, body: api.LabelRequest) -> api.Saved:
        person = await self._annotator(request)
        unknown = set(body.choices) - {"overall", *self.settings.criteria}
        if unknown:
            raise APIError(400, f"unknown criterion {sorted(unknown)[0]!r}", param="choices")
        if len(body.comment) > self.settings.max_comment_chars:
            raise APIError(400, f"comment over {self.settings.max_comment_chars} characters", param="comment")
        label = await self._call(
            self.store.submit, person.id, body.slot, dict(body.choices), body.comment, body.request_id
        )
        return api.Saved(label=label, progress=await self._progress(person))

    @app.post("/api/skip", responses=api.errors(400, 401, 403, 404, 409))
    async def skip(self, request: Request, body: api.SlotRequest) -> api.Next:
        person = await self._annotator(request)
        await self._call(self.store.skip, person.id, body.slot)
        return await self.next_item(request)

    @app.post("/api/undo", responses=api.errors(400, 401, 403))
    async def undo(self, request: Request, body: api.EmptyRequest) -> api.Next:
        person = await self._annotator(request)
        undone = await self._call(self.store.undo, person.id)
        if undone is None:
            return await self.next_item(request)
        job, previous, comment = undone
        progress = await self._progress(person)
        return api.Next(
            item=_item(job), progress=progress, criteria=self.settings.criteria, previous=previous, comment=comment
        )

    # ---- admins -------------------------------------------------------------------------------

    @app.get("/api/admin/stats", responses=api.errors(401, 403))
    async def admin_stats(self, request: Request) -> dict:
        await self._who(request, admin=True)
        return await self._call(stats, self.store)

    @app.get("/api/admin/items", responses=api.errors(401, 403))
    async def admin_items(self, request: Request, limit: int = 20) -> list[api.AdminItem]:
        await self._who(request, admin=True)
        rows = await self._call(recent_items, self.store, max(1, min(limit, 200)))
        if self.reward is not None and rows:
            texts = [r["response_a"] for r in rows] + [r["response_b"] for r in rows]
            scores = await self.reward.score.remote(texts, [r["prompt"] for r in rows] * 2, True)
            for r, a, b in zip(rows, scores[: len(rows)], scores[len(rows) :]):
                r["score_a"], r["score_b"] = a, b
        return [api.AdminItem(**r) for r in rows]

    @app.post("/api/admin/invite", responses=api.errors(400, 401, 403))
    async def invite(self, request: Request, body: api.InviteRequest) -> api.Invited:
        await self._who(request, admin=True)
        token = await self._call(self.store.invite, body.name, body.role)
        root = request.scope.get("root_path", "")
        return api.Invited(name=body.name, link=f"{root}/{'admin' if body.role == 'admin' else ''}#t={token}")
