"""A web demo of a trained run (Gradio): caption an uploaded image (and draw it again from the caption
and from z), generate an image and its caption from a seed, and a gallery of a batch of seeds.

    python demo.py --run_dir checkpoints/toy [--port 7860]          # then open http://127.0.0.1:7860

It serves on 127.0.0.1 only (--host to change that), never makes a share link, sends no analytics
and needs no internet. Scripts can call it too, with gradio_client:
    Client("http://127.0.0.1:7860").predict(handle_file("img.png"), api_name="/caption")
    Client("http://127.0.0.1:7860").predict(42, api_name="/generate")
"""
import argparse
import os
import sys
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then

import torch  # noqa: E402

import common  # noqa: E402
import errors  # noqa: E402
from data.coco import image_transform, load_rgb  # noqa: E402
from errors import UnreadableImage  # noqa: E402

MAX_SEED = 2 ** 31 - 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common.add_generator_args(p)
    # the caption tab's enhancer, with infer.py's flags; its default: RUN/flow_degrade when there, else none
    common.add_enhancer_args(p).set_defaults(enhancer=None)
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.enhancer is None and args.run_dir and os.path.isdir(os.path.join(args.run_dir, "flow_degrade")):
        args.enhancer = os.path.join(args.run_dir, "flow_degrade")
    return args


def load_enhancer(args, vlv):
    """The caption tab's optional enhancer (through common.load_enhancer's checks), or None."""
    if args.enhancer in (None, "none"):
        return None
    enhancer = common.load_enhancer(args, vlv)
    vlv.enhancer = None  # switched on per request
    return enhancer


def bad_input(message):
    """The page's message for a user's bad input: shown there, not logged as a server traceback."""
    import gradio as gr
    return gr.Error(message, print_exception=False)


def image_upload(**kwargs):
    """gr.Image whose upload is checked by us: Gradio would answer a file that is not an image with a
    generic "Error"; this says what is wrong in the page. (The instance's preprocess is wrapped rather
    than the class subclassed: Gradio writes a .pyi stub beside the module of any Component subclass.)"""
    import gradio as gr
    image = gr.Image(**kwargs)
    preprocess = image.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except Exception as e:  # PIL's UnidentifiedImageError, a truncated file, ...
            name = getattr(payload, "orig_name", None) or "the file"
            raise bad_input(f"{name} is not an image this demo can read ({type(e).__name__}); upload a JPEG, "
                           f"PNG or WebP file.") from None

    image.preprocess = checked
    return image


def build_demo(gen, enhancer=None, num_beams=3):
    """The Blocks app of a models.generator.MultimodalGenerator (and an optional enhancer for captions)."""
    import gradio as gr
    vlv = gen.vlv
    transform = image_transform(vlv.image_size)
    lock = threading.Lock()  # one request at a time on the model (the enhancer switch is shared state)

    def read_image(path):
        if path is None:
            raise bad_input("No image: upload one (JPEG, PNG or WebP) first.")
        try:
            return transform(load_rgb(path)).unsqueeze(0).to(gen.device)
        except UnreadableImage as e:
            raise bad_input(f"{os.path.basename(path)} is not an image this demo can read ({e.reason}); "
                           f"upload a JPEG, PNG or WebP file.") from None

    def caption(image_path, beams=num_beams, max_new_tokens=30, use_enhancer=False, from_caption=True, from_z=True):
        images = read_image(image_path)
        with lock:
            vlv.enhancer = enhancer if use_enhancer else None
            try:
                text = vlv.caption(images, **dict(gen.decoding, num_beams=int(beams),
                                                  max_new_tokens=int(max_new_tokens)))[0]
                drawn = [common.to_pil(vlv.regenerate(images, captions, gen.num_inference_steps,
                                                      gen.guidance_scale)[0]) if wanted else None
                         for wanted, captions in ((from_caption, [text]), (from_z, None))]
            finally:
                vlv.enhancer = None
        return text, drawn[0], drawn[1]

    def seed_of(value, what="seed"):
        if value is None or not 0 <= value <= MAX_SEED:
            raise bad_input(f"The {what} must be a whole number from 0 to {MAX_SEED}.")
        return int(value)

    def generate(seed=0):
        seed = seed_of(seed)
        with lock:
            image, text, meta = gen.generate_with_metadata(seed)
        return image, text, meta

    def gallery(first_seed=0, count=8):
        first = seed_of(first_seed, "first seed")
        with lock:
            results = gen.generate_batch(range(first, min(first + int(count), MAX_SEED + 1)), progress=False)
        return [(image, f"{meta['seed']}: {text}") for image, text, meta in results]

    with gr.Blocks(title="VLV: image <-> z <-> caption", analytics_enabled=False) as demo:
        gr.Markdown("# VLV\nAn image becomes a caption embedding z; z becomes a caption and an image again. "
                    "A seed drawn through the prior over z gives a new image and its caption.")
        with gr.Tab("Caption an image"):
            with gr.Row():
                with gr.Column():
                    image_in = image_upload(type="filepath", label="image", sources=["upload", "clipboard"])
                    beams = gr.Slider(1, 8, value=num_beams, step=1, label="beams")
                    length = gr.Slider(4, 60, value=30, step=1, label="max new tokens")
                    use_enhancer = gr.Checkbox(False, label="enhance z first" + ("" if enhancer else " (no enhancer)"),
                                               interactive=enhancer is not None)
                    from_caption = gr.Checkbox(True, label="draw it again from the caption")
                    from_z = gr.Checkbox(True, label="draw it again from z")
                    caption_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                with gr.Column():
                    caption_out = gr.Textbox(label="caption", elem_id="caption-out")
                    regen_out = gr.Image(label="from the caption", format="png", height=256, elem_id="regen-out")
                    recon_out = gr.Image(label="from z", format="png", height=256, elem_id="recon-out")
            caption_button.click(caption, [image_in, beams, length, use_enhancer, from_caption, from_z],
                                 [caption_out, regen_out, recon_out], api_name="caption")
        with gr.Tab("Generate from a seed"):
            with gr.Row():
                with gr.Column():
                    seed_slider = gr.Slider(0, 1000, value=42, step=1, label="seed")
                    seed_in = gr.Number(42, precision=0, minimum=0, maximum=MAX_SEED, label="seed (any up to 2^31 - 1)",
                                        elem_id="seed-in")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    image_out = gr.Image(label="image", format="png", height=256, elem_id="generated-image")
                    text_out = gr.Textbox(label="caption", elem_id="generated-caption")
                    meta_out = gr.JSON(label="metadata")
            seed_slider.change(lambda s: s, seed_slider, seed_in, api_name=False)
            generate_button.click(generate, seed_in, [image_out, text_out, meta_out], api_name="generate")
        with gr.Tab("Gallery"):
            with gr.Row():
                first = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="first seed")
                count = gr.Slider(1, 64, value=8, step=1, label="how many")
                gallery_button = gr.Button("Draw", variant="primary")
            pairs = gr.Gallery(label="seed: caption", columns=8, format="png")
            gallery_button.click(gallery, [first, count], pairs, api_name="gallery")
    return demo


def main(argv=None):
    args = parse_args(argv)
    gen = common.load_generator(args.run_dir, args.stage1_ckpt, args.stage2_ckpt, args.prior, args.device,
                                ode_steps=args.ode_steps, solver=args.solver,
                                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                decoding=dict(num_beams=args.num_beams))
    enhancer = load_enhancer(args, gen.vlv)
    demo = build_demo(gen, enhancer, args.num_beams)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops it)", file=sys.stderr)
    demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=False)


if __name__ == "__main__":
    errors.run(main)
