"""Every text a user reads from supportbot, in one place so wording stays consistent and reviewable."""

EMPTY_MESSAGE = "I got an empty message. Describe what is broken (device, what you see, any error code) and I'll look for a fix."
BINARY_MESSAGE = (
    "That looks like binary data, not text, so I can't read it. Please type the problem, "
    "or paste the error message as text."
)
TRUNCATED_NOTE = "(Your message was very long; I read the first {limit:,} characters.)"
NOT_SURE = (
    "I'm not sure: I found no resolved ticket that matches this problem, and I'd rather not guess. "
    "Reply /escalate to hand it to a technician."
)
POSSIBLY_RELATED = "Possibly related: {tickets}."
SOURCES = "Sources: {ids}"
FIXED_BEFORE = "What fixed this before: {fix} ({id}{took})"
FIX_TIME = "Estimated fix time: about {hours:g} h"
# A technician asking the bot themselves gets every matching ticket, not only the composed answer.
TECHNICIAN_TICKETS = "All matching tickets ({count}), best first:"
TECHNICIAN_TICKET = "[{id}] {title}{machine}{took}\n  Found: {found}\n  Repair: {fix}"
TECHNICIAN_NO_HOURS = "time not recorded"
DELAYED = "Sorry, this is taking longer than usual. I'm still on it."
FAILED = "Sorry, I couldn't answer this one (reference {ref}). It has been logged; reply /escalate to reach a technician."
TIMED_OUT = "Sorry, I ran out of time writing an answer (reference {ref}). Reply /escalate to reach a technician."
PRIVACY_HELD = (
    "I couldn't safely remove personal details from your message, so I didn't process it. "
    "It is kept aside for review (reference {ref}). Please rephrase without names or contact details."
)
RATE_LIMITED = "You're sending questions faster than I can answer. Please wait a moment and try again."
NO_WORKER = (
    "No supportbot worker is reachable on the configured broker ({broker}). "
    "Start one with `supportbot worker` and try again."
)
WAIT_TIMEOUT = "No answer arrived within {seconds:g} s. Your question is saved (message {message_id}) and will be answered."
CUT_SHORT = "(I was busy and had to cut this answer short; ask again or reply /escalate if it is not enough.)"

# Chat platforms (bot/slack, bot/telegram): what their buttons, commands and notices say.
WORKING_ON_IT = "Working on it…"
RATED = "Thanks: rated {emoji}"
RATED_WITH_REASON = "Thanks: rated {emoji}, reason recorded"
BUTTON_GOOD = "👍 Helpful"
BUTTON_BAD = "👎 Not helpful"
BUTTON_ESCALATE = "Get a technician"
# Honest about what happens: the escalation is on the technicians' desk (CLI and web console) and the
# bot stops answering in this conversation (core/desk.py desk_takes).
ESCALATED = (
    "Handed to the support team (escalation #{id}) with this conversation's questions. I've stopped "
    "answering in this conversation so that the technicians can take over."
)
NOTHING_TO_ESCALATE = "There is nothing to hand over yet: ask your question first."
BAD_REASON_TITLE = "What was wrong?"
BAD_REASON_LABEL = "Tell us why the answer did not help (optional)"
BAD_REASON_PROMPT = "Sorry it did not help. What was wrong with answer #{id}? Reply to this message (optional)."
REASON_THANKS = "Thanks, your reason was recorded."
CITED = "Cited tickets: {tickets}"
NOT_TEXT = (
    "I can only read text. Please describe the problem in words (device, what you see, any error code); "
    "you can paste an error message as text."
)
CHAT_HELP = (
    "Describe what is broken (device, what you see, any error code) and I look for how it was fixed before.\n"
    "Rate an answer with 👍 or 👎; \"Get a technician\" records the conversation for the support team.\n"
    "Commands: /new starts a new conversation, /escalate records the current one for the support team, "
    "/help shows this."
)
CHAT_START = "Hi! I answer IT and equipment questions from the tickets our technicians solved. " + CHAT_HELP
NEW_CONVERSATION = "Started a new conversation. What is broken?"
GROUP_NEW = "In groups every question starts its own conversation; reply to my answer to continue one."

# The escalation desk (core/desk.py): what employees and technicians are told. Each promises only what
# the code does: the escalation is recorded, the bot stops answering here, a technician's replies are
# relayed into this conversation once one claims it.
DESK_ESCALATED = (
    "Escalated (#{id}). I've handed this conversation to the technicians and stopped answering here "
    "myself. When a technician claims it, their replies appear in this conversation, marked as from a "
    "technician; anything you add here now is passed on to them."
)
DESK_ALREADY_ESCALATED = (
    "Escalated (#{id}) already, status {status}. Anything you add here is passed on to the technicians."
)
DESK_NOTHING_TO_ESCALATE = "Nothing to escalate yet: ask your question first."
DESK_FROM_TECHNICIAN = "Technician: {text}"
DESK_FROM_EMPLOYEE = "Employee (escalation #{id}): {text}"
DESK_FROM_OTHER_EMPLOYEE = "Another employee in the thread of escalation #{id}: {text}"
DESK_CLAIMED = "A technician has taken your escalation #{id} and will reply in this conversation."
DESK_RESOLVED = (
    "A technician resolved escalation #{id}: {text}\n"
    "Did it work? If not, reply /escalate and the technicians get it back."
)
DESK_REOPENED = "Escalation #{id} is open again; the technicians were told."
DESK_NOT_TECHNICIAN = (
    "{who} is not a technician: only technicians can {action} escalations (settings `technicians`, "
    "e.g. SUPPORTBOT_TECHNICIANS='[\"slack:U1\"]', or a user with role technician)."
)
DESK_NO_SUCH = "There is no escalation #{id}."
DESK_ALREADY_RESOLVED = "Escalation #{id} is resolved already; reopen it first."
DESK_NOT_RESOLVED = "Escalation #{id} is not resolved, so there is nothing to reopen."
DESK_CLAIMED_BY_OTHER = "Escalation #{id} is claimed by another technician ({who})."
DESK_EMPTY_RESOLUTION = "A resolution needs the fix in words: what was done to repair it."
DESK_BAD_HOURS = "Hours must be a number between 0 and 1000, got {hours!r}."
DESK_RESOLUTION_REFUSED = (
    "Escalation #{id} stays open: the resolution reads like instructions to an assistant ({reasons}), "
    "so it was not stored as a ticket. Please write only the repair that was done."
)
DESK_PING_UNCLAIMED = "Escalation #{id} has been waiting {minutes} min with nobody on it. {summary}"
DESK_PING_IDLE = "Reminder: escalation #{id}, claimed by you, has had no activity for {minutes} min."

# The desk on Slack and Telegram (bot/slack, bot/telegram, workers/desk_tasks.py): the escalation card
# technicians see, its buttons, and what the desk thread is told.
BUTTON_CLAIM = "Claim"
BUTTON_RESOLVE = "Resolve"
DESK_CARD_TITLE = "Escalation #{id}: {status}"
DESK_CARD_SEVERITY = "Severity: {severity} ({reason})"
DESK_CARD_SEVERITY_PENDING = "Severity: not estimated yet"
DESK_CARD_WHY = "Why the employee escalated: {reason}"
DESK_CARD_ASSIGNEE = "Claimed by {who}"
DESK_CARD_TICKET = "Resolved as ticket {ticket}"
DESK_CARD_LINK = "Employee's thread: {link}"
DESK_CARD_HOW = (
    "Reply in this thread to write to the employee; start with \"note:\" to keep it among technicians. "
    "Resolve asks for the fix, which becomes a ticket the bot finds next time."
)
DESK_CLAIMED_DESK = "Escalation #{id} claimed by {who}."
DESK_RESOLVED_DESK = "Escalation #{id} resolved by {who}; the fix is ticket {ticket} and the employee was asked to confirm."
DESK_NOT_RELAYED = "Not passed on (escalation #{id}): {error}"
DESK_RESOLVE_TITLE = "Resolve escalation"
DESK_RESOLVE_LABEL = "What fixed it (this becomes a ticket)"
DESK_RESOLVE_HOURS = "Hours it took"
DESK_RESOLVE_MACHINE = "Machine or device"
DESK_RESOLVE_PROMPT = (
    "Resolution for escalation #{id}: reply to this message with what fixed it (it becomes a ticket the "
    "bot finds next time). You can also reply /resolve <fix> to the escalation."
)
DESK_RESOLVE_USAGE = "Reply /resolve <what fixed it> to an escalation's message on the desk."
DESK_RESOLVING = "Resolving escalation #{id}…"

# Admins in chat (model/retrain.py, bot/slack/admin.py, bot/telegram/admin.py): retrain, promote, roll back.
ADMIN_HELP = (
    "Admin commands: status (active model, latest candidate, new ratings), retrain (train a candidate on what "
    "was rated since the active model and report back), models (the registry), promote NAME (a candidate that "
    "passed the gate), rollback (back to the previous model)."
)
ADMIN_REFUSED = "Refused: {why}"
ADMIN_RETRAIN_QUEUED = (
    "Retraining queued: I export what was rated since the active model, train a candidate, evaluate it "
    "against the active model and the base, and send you the report here."
)
ADMIN_RETRAIN_BUSY = "A training run is already {status} (run {run}); I report when it is done."
ADMIN_ACTIVE = "Active model: {name} (promoted {since})"
ADMIN_ACTIVE_BASE = "Active model: the base model (no adapter promoted yet)"
ADMIN_CANDIDATE = "Latest candidate: {name} ({status}): {verdict}"
ADMIN_NO_CANDIDATE = "Latest candidate: none"
ADMIN_NOT_EVALUATED = "not evaluated from chat"
ADMIN_NEW_RATINGS = "New ratings since the last training run: {count}"
ADMIN_RUNNING = "Training run {run} is {status} (step {step}/{total_steps})"
ADMIN_NO_MODELS = "No adapters yet: the base model serves. Retrain once answers are rated."
ADMIN_PROMOTED = "Promoted {name}: new answers come from it (model_version shows it)."
ADMIN_ROLLED_BACK = "Rolled back: {name} serves now."
ADMIN_PROMOTE_NEEDS_NAME = "promote needs the candidate's name (see models)."
ADMIN_REPORT = "Retrain report: candidate {name} (run {run}). Promotion gate: {verdict}. {why}"
ADMIN_GATE_PASSED = "passed, press Promote to serve it"
ADMIN_GATE_REFUSED = "refused, the active model keeps serving"
ADMIN_NOTHING_NEW = "Nothing to retrain on: no conversation was rated since {since}. The active model keeps serving."
ADMIN_RETRAIN_FAILED = "Retraining failed (run {run}): {error}. The active model keeps serving."
ADMIN_SCHEDULED = "Scheduled retrain (enough new ratings came in). "
ADMIN_LOSS_TITLE = "Loss curve of {name}"
BUTTON_RETRAIN = "Retrain"
BUTTON_PROMOTE = "Promote"
BUTTON_ROLLBACK = "Roll back"
