"""The HH-RLHF dialogue format, in one place: turn tags, how a reply joins its prompt, where a reply
ends.

What: every stage reads and writes dialogues in the format of Anthropic's HH-RLHF data (paper Sec.
4): "\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:". A prompt ends with the
assistant tag; a reply follows it after exactly one space; a reply ends where the next human turn
begins (the RLCD reference code cuts sampled text there, and its preference model reads prompt +
reply + "\\n\\nHuman:" so the score sits on a fixed end token). The sampler, the simulator, the
preference model, SFT, PPO and evaluation all import these helpers, so the seam between a prompt and
its reply is defined once (two earlier bugs, a doubled seam space and a KL measured on re-tokenised
text, came from copies of it drifting apart).
Simplified: no system prompts or chat templates; the paper's models are base LLaMAs prompted in this
format.
Run: `python -c "from nanorlcd.dialogue import as_prompt; print(repr(as_prompt('Hi')))"`
"""

HUMAN = "\n\nHuman:"            # opens a human turn; also the stop string that ends a sampled reply
ASSISTANT = "\n\nAssistant:"    # opens an assistant turn; every prompt ends with it


def as_prompt(request):
    """A bare request -> a one-turn prompt; text that already holds an assistant turn is returned
    unchanged."""
    return request if "Assistant:" in request else f"{HUMAN} {request}{ASSISTANT}"


def join(prompt, reply):
    """Prompt + reply with exactly one space at the seam (a reply's own leading whitespace is
    dropped: raw HH replies start with " ", and a doubled space is a token the policy never emits
    after "Assistant:")."""
    return prompt + " " + reply.lstrip() if prompt else reply


def cut_reply(text):
    """Sampled continuation -> the reply: everything before the next human turn, stripped."""
    return text.split(HUMAN)[0].strip()


def reward_text(prompt, reply):
    """What a preference model reads: the reference appends the next human turn, so the score is
    always read on the same end token whatever the reply."""
    return join(prompt, reply) + HUMAN
