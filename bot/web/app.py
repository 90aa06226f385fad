"""The web console application: FastAPI routes rendering Jinja2 templates.

Every page checks the viewer's role through core.roles (the one place roles are decided); every POST
checks the session's CSRF token before anything else, and every privileged POST is authorized and
audited there too. Heavy parts (the ticket index, the language model for the promotion gate) load on
first use, so the pages that only count rows start in a moment.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.datastructures import FormData

from bot.web import charts, queries
from bot.web.auth import (
    COOKIE,
    SESSION_MAX_AGE_S,
    SessionSigner,
    WebSession,
    csrf_ok,
    secret_key,
    verify_login,
)
from core.errors import InputError, SupportbotError
from core.roles import ACTIONS, FAILED, SUCCEEDED, Actor, PermissionDenied, allows, authorize, record, role_of
from core.schema import QuarantinedTicket, Role, WebAccount
from core.settings import Settings

log = logging.getLogger("supportbot.web")

HERE = Path(__file__).resolve().parent
# (path, label, action the viewer's role must allow)
PAGES = [
    ("/", "Overview", "console.view"),
    ("/conversations", "Conversations", "console.view"),
    ("/escalations", "Escalations", "escalations.view"),
    ("/tickets", "Tickets", "tickets.search"),
    ("/training", "Training", "console.view"),
    ("/models", "Models", "console.view"),
    ("/audit", "Audit", "console.view"),
]
PERIODS = (7, 30, 90)
# The overview aggregates every question of the period; a dashboard a minute behind is fine, a slow one
# is not (bench/web.py measures both the page and the queries alone).
OVERVIEW_TTL_S = 30.0


class LoginRequired(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


class CsrfRefused(Exception):
    pass


class Viewer:
    """The logged-in account on this request, with its role."""

    def __init__(self, name: str, role: Role, web_session: WebSession) -> None:
        self.name = name
        self.role = role
        self.session = web_session
        self.actor = Actor(platform="web", external_id=name)

    def may(self, action: str) -> bool:
        return allows(self.role, action)


class Console:
    """Settings, database and the lazily loaded heavy parts one console process shares."""

    def __init__(self, *, settings: Settings, database: Any, overview_ttl_s: float = OVERVIEW_TTL_S) -> None:
        self.settings = settings
        self.database = database
        self.signer = SessionSigner(secret_key(settings))
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.flashes: dict[str, str] = {}
        self.jobs: dict[str, dict[str, str]] = {}  # model name -> promotion job state
        # One gate at a time: it loads the model and evaluates, which is all the CPU a small host has.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="supportbot-web-gate")
        self._lock = threading.Lock()
        self._index: Any = None
        self._lm: Any = None
        self.overview_ttl_s = overview_ttl_s
        self._overviews: dict[int, tuple[float, dict[str, Any]]] = {}  # days -> (computed at, data)
        self._refreshing: set[int] = set()

    def overview(self, days: int) -> dict[str, Any]:
        """The overview's numbers, at most ``overview_ttl_s`` old. A stale copy is served while one
        background refresh runs, so no viewer waits for the aggregate queries except the very first."""
        cached = self._overviews.get(days)
        now = time.monotonic()
        if cached is None or self.overview_ttl_s <= 0:
            return self._compute_overview(days)
        if now - cached[0] > self.overview_ttl_s:
            with self._lock:
                start = days not in self._refreshing
                self._refreshing.add(days)
            if start:
                threading.Thread(target=self._refresh_overview, args=(days,), daemon=True).start()
        return cached[1]

    def _compute_overview(self, days: int) -> dict[str, Any]:
        started = time.monotonic()
        with self.database.session() as session:
            data = queries.overview(session=session, days=days)
        data["as_of"] = datetime.now(timezone.utc).strftime("%H:%M:%S")
        self._overviews[days] = (started, data)
        return data

    def _refresh_overview(self, days: int) -> None:
        try:
            self._compute_overview(days)
        except Exception:  # the stale copy stays; the next request tries again
            log.exception("web console: refreshing the overview failed")
        finally:
            with self._lock:
                self._refreshing.discard(days)

    def ticket_index(self, *, reopen: bool = False) -> Any:
        from retrieval.search import TicketIndex

        with self._lock:
            if self._index is None or reopen:
                # Opening reconciles the persisted index with SQL (what the CLI's release does too).
                self._index = TicketIndex.open(settings=self.settings, db=self.database)
            return self._index

    def language_model(self) -> Any:
        from model.runtime import LanguageModel

        with self._lock:
            if self._lm is None:  # for the promotion gate, whose validation loss is transformers' forward pass
                self._lm = LanguageModel(self.settings.model_copy(update={"model_loader": "transformers"}))
            return self._lm


def create_app(*, settings: Settings, database: Any, overview_ttl_s: float = OVERVIEW_TTL_S) -> FastAPI:
    console = Console(settings=settings, database=database, overview_ttl_s=overview_ttl_s)
    app = FastAPI(title="supportbot console", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.console = console
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def session_cookie(request: Request, call_next: Callable[[Request], Any]) -> Response:
        loaded = console.signer.loads(request.cookies.get(COOKIE))
        request.state.web_session = loaded or WebSession.anonymous()
        request.state.session_changed = loaded is None
        response: Response = await call_next(request)
        if request.state.session_changed:
            response.set_cookie(
                COOKIE, console.signer.dumps(request.state.web_session), max_age=SESSION_MAX_AGE_S,
                httponly=True, samesite="strict", secure=settings.environment == "production",
            )  # fmt: skip
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; style-src 'self'; img-src 'self' data:")
        return response

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, err: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(err.path)}", status_code=303)

    @app.exception_handler(CsrfRefused)
    async def _csrf_refused(request: Request, err: CsrfRefused) -> Response:
        return _error(request, 403, "This form is out of date or did not come from the console (CSRF check). "
                                    "Reload the page and try again.")  # fmt: skip

    @app.exception_handler(PermissionDenied)
    async def _denied(request: Request, err: PermissionDenied) -> Response:
        return _error(request, 403, str(err))

    @app.exception_handler(SupportbotError)
    async def _refused(request: Request, err: SupportbotError) -> Response:
        return _error(request, 400, str(err))

    def _error(request: Request, status: int, message: str) -> Response:
        return console.templates.TemplateResponse(
            request, "error.html", {"message": message, "status": status, "viewer": None, "pages": []},
            status_code=status,
        )  # fmt: skip

    # --- who is asking ------------------------------------------------------------------------

    def viewer(request: Request) -> Viewer:
        web_session: WebSession = request.state.web_session
        if web_session.account is None:
            raise LoginRequired(request.url.path)
        with database.session() as session:
            role = role_of(session=session, platform="web", external_id=web_session.account, settings=settings)
            exists = session.scalars(select(WebAccount.id).where(WebAccount.name == web_session.account)).first()
        if exists is None:  # the account was deleted: the signed cookie alone is not enough
            request.state.web_session = WebSession.anonymous()
            request.state.session_changed = True
            raise LoginRequired(request.url.path)
        return Viewer(web_session.account, role, web_session)

    def allowed(action: str) -> Callable[[Request], Viewer]:
        def check(request: Request) -> Viewer:
            who = viewer(request)
            if not who.may(action):
                with database.session() as session:  # the refusal is audited, then explained
                    authorize(session=session, actor=who.actor, action=action, settings=settings,
                              detail=f"{request.method} {request.url.path}")  # fmt: skip
            return who

        return check

    async def checked_form(request: Request) -> FormData:
        """Every POST: the form must carry this session's CSRF token."""
        form = await request.form()
        token = form.get("csrf_token")
        if not csrf_ok(request.state.web_session, token if isinstance(token, str) else None):
            raise CsrfRefused()
        return form

    def render(request: Request, name: str, who: Viewer | None, **context: Any) -> Response:
        web_session: WebSession = request.state.web_session
        flash = console.flashes.pop(web_session.csrf, None)
        pages = [(path, label) for path, label, action in PAGES if who is not None and who.may(action)]
        return console.templates.TemplateResponse(
            request, name,
            {"viewer": who, "pages": pages, "csrf": web_session.csrf, "flash": flash, "path": request.url.path,
             **context},
        )  # fmt: skip

    def done(request: Request, where: str, message: str) -> Response:
        console.flashes[request.state.web_session.csrf] = message
        return RedirectResponse(where, status_code=303)

    # --- login --------------------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/") -> Response:
        return render(request, "login.html", None, next=_local(next), error=None)

    @app.post("/login", response_class=HTMLResponse)
    def login(request: Request, form: FormData = Depends(checked_form)) -> Response:
        name, password = str(form.get("name", "")), str(form.get("password", ""))
        target = _local(str(form.get("next", "/")))
        with database.session() as session:
            account = verify_login(session=session, name=name, password=password)
            account_name = account.name if account else None
        if account_name is None:
            log.info("web console: failed login for %r", name[:100])
            response = render(request, "login.html", None, next=target, error="Wrong name or password.")
            response.status_code = 401
            return response
        # A new session and a new CSRF token at login: nothing issued before it carries over.
        request.state.web_session = WebSession.for_account(account_name)
        request.state.session_changed = True
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    def logout(request: Request, form: FormData = Depends(checked_form)) -> Response:
        request.state.web_session = WebSession.anonymous()
        request.state.session_changed = True
        return RedirectResponse("/login", status_code=303)

    # --- pages --------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, days: int = 30, who: Viewer = Depends(allowed("console.view"))) -> Response:
        days = days if days in PERIODS else 30
        data = console.overview(days)
        short = [label[5:] for label in data["labels"]]  # MM-DD
        outcome_chart = charts.stacked_bars("Questions per day by outcome", short, data["per_day"])
        latency_chart = charts.lines("Answer latency per day (seconds)", short, {"p50": data["p50"], "p95": data["p95"]})
        thumbs_chart = charts.lines("Answers rated good (👍) per day, % of ratings", short, {"good %": data["thumbs"]}, y_max=100)
        return render(request, "overview.html", who, data=data, periods=PERIODS, ttl=console.overview_ttl_s,
                      charts=[outcome_chart, latency_chart, thumbs_chart])  # fmt: skip

    @app.get("/conversations", response_class=HTMLResponse)
    def conversation_list(
        request: Request,
        rating: str = "",
        platform: str = "",
        escalated: str = "",
        date_from: str = "",
        date_to: str = "",
        page: int = 1,
        who: Viewer = Depends(allowed("console.view")),
    ) -> Response:
        where = queries.ConversationFilter(
            rating=rating if rating in ("good", "bad", "unrated") else "",
            platform=platform[:20],
            escalated=escalated if escalated in ("yes", "no") else "",
            date_from=_date(date_from, "from"),
            date_to=_date(date_to, "to"),
            page=max(1, page),
        )
        with database.session() as session:
            data = queries.conversations(session=session, where=where)
        filters = {"rating": where.rating, "platform": where.platform, "escalated": where.escalated,
                   "date_from": date_from, "date_to": date_to}  # fmt: skip
        return render(request, "conversations.html", who, data=data, filters=filters)

    @app.get("/conversations/{conversation_id}", response_class=HTMLResponse)
    def conversation_page(
        request: Request, conversation_id: int, who: Viewer = Depends(allowed("console.view"))
    ) -> Response:
        with database.session() as session:
            data = queries.conversation(session=session, conversation_id=conversation_id)
        if data is None:
            return _error(request, 404, f"There is no conversation {conversation_id}.")
        return render(request, "conversation.html", who, conv=data)

    @app.get("/escalations", response_class=HTMLResponse)
    def escalation_page(
        request: Request, status: str = "", who: Viewer = Depends(allowed("escalations.view"))
    ) -> Response:
        with database.session() as session:
            data = queries.escalations(session=session, status=status)
        return render(request, "escalations.html", who, data=data, status=status)

    @app.get("/tickets", response_class=HTMLResponse)
    def tickets_page(request: Request, q: str = "", who: Viewer = Depends(allowed("tickets.search"))) -> Response:
        from retrieval import store

        result, problem = None, None
        if q.strip():
            try:
                result = console.ticket_index().search(q)
            except SupportbotError as err:
                problem = str(err)
        with database.session() as session:
            held = store.quarantined(session=session, limit=200)
            total = store.count_tickets(session=session)
        return render(request, "tickets.html", who, q=q, result=result, problem=problem, held=held, total=total)

    @app.post("/tickets/quarantine/{ticket_id}/release")
    def release(request: Request, ticket_id: str, form: FormData = Depends(checked_form),
                who: Viewer = Depends(allowed("tickets.search"))) -> Response:  # fmt: skip
        from retrieval import store

        with database.session() as session:
            authorize(session=session, actor=who.actor, action="tickets.release", settings=settings, detail=ticket_id)
            outcome = store.release_quarantined(session=session, ids=[ticket_id])
        released = outcome.added + outcome.updated + outcome.unchanged
        if not released:
            raise InputError(f"{ticket_id} is not quarantined (released or deleted already?)")
        if outcome.changed:
            console.ticket_index(reopen=True)
        with database.session() as session:
            record(session=session, actor=who.actor, role=who.role, action="tickets.release", result=SUCCEEDED,
                   detail=ticket_id)  # fmt: skip
        return done(request, "/tickets", f"Released {ticket_id} into the index.")

    @app.post("/tickets/quarantine/{ticket_id}/delete")
    def delete(request: Request, ticket_id: str, form: FormData = Depends(checked_form),
               who: Viewer = Depends(allowed("tickets.search"))) -> Response:  # fmt: skip
        from retrieval import store

        with database.session() as session:
            authorize(session=session, actor=who.actor, action="tickets.delete", settings=settings, detail=ticket_id)
            deleted = store.delete_tickets(session=session, ids=[ticket_id], table=QuarantinedTicket)
        if not deleted:
            raise InputError(f"{ticket_id} is not quarantined (released or deleted already?)")
        with database.session() as session:
            record(session=session, actor=who.actor, role=who.role, action="tickets.delete", result=SUCCEEDED,
                   detail=ticket_id)  # fmt: skip
        return done(request, "/tickets", f"Deleted the quarantined ticket {ticket_id}.")

    @app.get("/training", response_class=HTMLResponse)
    def training_page(request: Request, who: Viewer = Depends(allowed("console.view"))) -> Response:
        with database.session() as session:
            runs = queries.training_runs(session=session)
        return render(request, "training.html", who, runs=runs)

    @app.get("/training/{run_id}", response_class=HTMLResponse)
    def training_run_page(request: Request, run_id: int, who: Viewer = Depends(allowed("console.view"))) -> Response:
        with database.session() as session:
            run = queries.training_run(session=session, run_id=run_id)
        if run is None:
            return _error(request, 404, f"There is no training run {run_id}.")
        labels = [str(s) for s in run["steps"]]
        curve = charts.lines(f"Loss of run {run_id} by step", labels, {"train loss": run["loss"], "validation loss": run["val_loss"]},
                             connect=True)
        return render(request, "training_run.html", who, run=run, curve=curve)

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, who: Viewer = Depends(allowed("console.view"))) -> Response:
        from model import registry

        with database.session() as session:
            rows = [registry.describe(v) for v in registry.list_versions(session=session)]
        active = next((r["name"] for r in rows if r["status"] == "active"), None)
        return render(request, "models.html", who, rows=list(reversed(rows)), active=active, jobs=dict(console.jobs),
                      gate=registry.Gate())  # fmt: skip

    @app.post("/models/{name}/promote")
    def promote(request: Request, name: str, form: FormData = Depends(checked_form),
                who: Viewer = Depends(allowed("console.view"))) -> Response:  # fmt: skip
        from model import registry

        with database.session() as session:
            authorize(session=session, actor=who.actor, action="models.promote", settings=settings, detail=name)
            version = registry.get(session=session, name=name)
            if version.status.value not in ("candidate", "refused", "retired"):
                raise InputError(f"{name} is {version.status.value}; only a candidate can be promoted")
        if console.jobs.get(name, {}).get("state") == "evaluating":
            return done(request, "/models", f"{name} is being evaluated already.")
        console.jobs[name] = {"state": "evaluating", "why": "evaluating against the serving model"}
        console.executor.submit(_run_gate, console, name, who.actor, who.role)
        return done(request, "/models", f"Evaluating {name} through the promotion gate; this page shows the verdict.")

    @app.post("/models/rollback")
    def rollback(request: Request, form: FormData = Depends(checked_form),
                 who: Viewer = Depends(allowed("console.view"))) -> Response:  # fmt: skip
        from model import registry

        with database.session() as session:
            authorize(session=session, actor=who.actor, action="models.rollback", settings=settings)
            current = registry.active(session=session)
            previous = registry.rollback(session=session)
            serving = previous.name if previous else "the base model"
            retired = current.name if current else "-"
        with database.session() as session:
            record(session=session, actor=who.actor, role=who.role, action="models.rollback", result=SUCCEEDED,
                   detail=f"retired {retired}; now serving {serving}")  # fmt: skip
        return done(request, "/models", f"Rolled back {retired}; now serving {serving}.")

    @app.get("/audit", response_class=HTMLResponse)
    def audit_page(request: Request, who: Viewer = Depends(allowed("console.view"))) -> Response:
        from core.roles import audit_trail

        with database.session() as session:
            rows = audit_trail(session=session, limit=200)
        return render(request, "audit.html", who, rows=rows)

    assert {action for _, _, action in PAGES} <= set(ACTIONS)
    return app


def _run_gate(console: Console, name: str, actor: Actor, role: Role) -> None:
    """The promotion gate of `supportbot models promote`, on the console's own thread."""
    from model.evaluate import gate_candidate
    from model.registry import Gate

    try:
        verdict = gate_candidate(
            settings=console.settings, database=console.database, name=name, gate=Gate(), lm=console.language_model()
        )
        state = "promoted" if verdict["passed"] else "refused"
        console.jobs[name] = {"state": state, "why": verdict["why"]}
        result, detail = (SUCCEEDED if verdict["passed"] else FAILED), f"{name} {state}: {verdict['why']}"
    except Exception as err:
        ref = uuid.uuid4().hex[:8]
        log.exception("web console: promotion gate of %s failed (ref %s)", name, ref)
        why = str(err) if isinstance(err, SupportbotError) else f"unexpected error {ref} ({type(err).__name__}); see the console log"
        console.jobs[name] = {"state": "failed", "why": why}
        result, detail = FAILED, f"{name}: {why}"
    with console.database.session() as session:
        record(session=session, actor=actor, role=role, action="models.promote", result=result, detail=detail)


def _local(target: str) -> str:
    """Only paths of this site after login: an open redirect would let a link log someone in elsewhere."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _date(value: str, which: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError as err:
        raise InputError(f"the {which} date is YYYY-MM-DD, not {value[:20]!r}") from err
